#!/usr/bin/env python3
"""Fake device-mapper programs for a kernel without device-mapper.

One script, installed under the names it answers to (argv[0]): dmsetup,
flashcache_create, flashcache_load, sysctl, lvs, lvchange, lvconvert; and,
for unit tests only, systemctl, mountpoint and umount. The output formats are
the real programs' (flashcache's flashcache_status_table/_info, lvm2 2.03's
--nameprefixes); what happens underneath is a model:

- A cache that is loaded or created holds `initial_dirty` dirty blocks (the
  writes carbon made since boot) plus any dirty blocks its SSD kept from a
  fast remove.
- Cleaning (flashcache do_sync=1, lvmcache's cleaner policy, dmsetup remove
  with fast_remove=0, lvconvert --splitcache) drains `drain_per_second`
  blocks a second, from the moment it starts.
- `hang: true` models a disk that stops taking writes: cleaning makes no
  progress and a remove that has to write back never returns.
- Kernel state (which devices exist, their sysctls) lives under /run, which a
  container restart empties like a reboot; what a disk would keep (flashcache
  metadata on the SSD, LVM metadata) lives under /var/lib/fakedm.

Control: /var/lib/fakedm/control.json ({"drain_per_second": ..., "hang": ...,
"initial_dirty": ..., "busy": [paths], "units": {unit: state}}). FAKEDM_DIR
puts everything in one directory instead (unit tests). Every call that
changes something is logged: to FAKEDM_DIR/calls.log, or to the journal
(identifier fakedm) on a real host.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

TEST_DIR = os.environ.get("FAKEDM_DIR")
DISK_DIR = Path(TEST_DIR or "/var/lib/fakedm")
KERNEL_DIR = Path(TEST_DIR or "/run/fakedm")
DEFAULTS = {
    "drain_per_second": 1000,
    "hang": False,
    "initial_dirty": 4000,
    "total_blocks": 262144,
    "busy": [],
    "units": {},
}
TARGETS = (
    "flashcache       v1.0.4\n"
    "cache            v2.2.0\n"
    "striped          v1.6.0\n"
    "linear           v1.4.0\n"
)


def log(argv: list[str]) -> None:
    line = shlex.join([os.path.basename(argv[0]), *argv[1:]])
    if TEST_DIR:
        with open(DISK_DIR / "calls.log", "a") as handle:
            handle.write(line + "\n")
    else:
        subprocess.run(["logger", "-t", "fakedm", "--", line], check=False)


@contextmanager
def state():
    """The model's three files, locked, written back on exit."""
    DISK_DIR.mkdir(parents=True, exist_ok=True)
    KERNEL_DIR.mkdir(parents=True, exist_ok=True)
    with open(DISK_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        paths = {
            "control": DISK_DIR / "control.json",
            "disk": DISK_DIR / "disk.json",
            "kernel": KERNEL_DIR / "kernel.json",
        }
        data = {k: json.loads(p.read_text()) if p.exists() else {} for k, p in paths.items()}
        data["control"] = {**DEFAULTS, **data["control"]}
        data["disk"].setdefault("ssds", {})
        data["disk"].setdefault("lvs", {})
        data["kernel"].setdefault("devices", {})
        yield data
        for key in ("disk", "kernel"):
            tmp = paths[key].with_suffix(".tmp")
            tmp.write_text(json.dumps(data[key], indent=1, sort_keys=True))
            tmp.replace(paths[key])


def dirty_now(entry: dict, control: dict) -> int:
    since = entry.get("cleaning_since")
    if since is None or control["hang"]:
        return entry["dirty"]
    return max(0, int(entry["dirty"] - control["drain_per_second"] * (time.time() - since)))


def settle(entry: dict, control: dict, cleaning: bool) -> None:
    """Fold the drain so far into `dirty`, then start or stop cleaning."""
    entry["dirty"] = dirty_now(entry, control)
    entry["cleaning_since"] = time.time() if cleaning else None


def wait_clean(name: str, read_entry) -> None:
    """Block like the kernel does while a remove writes dirty blocks back."""
    while True:
        with state() as data:
            entry = read_entry(data)
            left = dirty_now(entry, data["control"])
            hang = data["control"]["hang"]
            rate = data["control"]["drain_per_second"]
        if not left:
            return
        time.sleep(3600 if hang else min(1.0, left / rate))


def fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr)
    return code


# ---------------------------------------------------------------- dmsetup


def dmsetup(args: list[str]) -> int:
    if not args:
        return fail("Usage: dmsetup [command] ...")
    command, rest = args[0], args[1:]
    if command == "targets":
        sys.stdout.write(TARGETS)
        return 0
    with state() as data:
        devices, control = data["kernel"]["devices"], data["control"]
        if command == "ls":
            for i, name in enumerate(sorted(devices)):
                print(f"{name}\t(253:{i})")
            if not devices:
                print("No devices found")
            return 0
        if not rest:
            return fail(f"dmsetup {command}: device name required")
        name = rest[0]
        device = devices.get(name)
        if device is None:
            return fail("Device does not exist.\nCommand failed.")
        if command == "info":
            print(f"Name:              {name}\nState:             ACTIVE\nOpen count:        0")
            return 0
        if command == "table":
            sys.stdout.write(flashcache_table(device, control))
            return 0
        if command == "status":
            sys.stdout.write(flashcache_status(device))
            return 0
        if command != "remove":
            return fail(f"fake dmsetup: unsupported command {command}")
        log(["dmsetup", *args])
        fast = device["sysctl"].get("fast_remove", 0) == 1
        if fast:
            ssd = data["disk"]["ssds"][device["ssd"]]
            ssd["dirty"] = dirty_now(device, control)
            del devices[name]
            return 0
        settle(device, control, cleaning=True)
    wait_clean(name, lambda d: d["kernel"]["devices"][name])
    with state() as data:
        device = data["kernel"]["devices"].pop(name)
        data["disk"]["ssds"][device["ssd"]]["dirty"] = 0
    return 0


def flashcache_table(device: dict, control: dict) -> str:
    total = control["total_blocks"]
    dirty = dirty_now(device, control)
    cached = max(dirty, total // 4)
    return (
        f"0 {device['sectors']} flashcache conf:\n"
        f"\tssd dev ({device['ssd']}), disk dev ({device['disk']}) cache mode(WRITE_BACK)\n"
        f"\tcapacity({total * 4 // 1024}M), associativity(512), data block size(4K) "
        "metadata block size(4096b)\n"
        "\tdisk assoc(256K)\n"
        f"\tskip sequential thresh({device['sysctl'].get('skip_seq_thresh_kb', 0)}K)\n"
        f"\ttotal blocks({total}), cached blocks({cached}), "
        f"cache percent({cached * 100 // total})\n"
        f"\tdirty blocks({dirty}), dirty percent({dirty * 100 // total})\n"
        "\tnr_queued(0)\n"
        "Size Hist: 4096:123456 \n"
    )


def flashcache_status(device: dict) -> str:
    return (
        f"0 {device['sectors']} flashcache stats: \n"
        "\treads(262), writes(18)\n"
        "\tread hits(254), read hit percent(96)\n"
        "\twrite hits(12) write hit percent(66)\n"
        "\tdirty write hits(5) dirty write hit percent(27)\n"
        "\treplacement(0), write replacement(0)\n"
        "\twrite invalidates(0), read invalidates(2)\n"
        "\tpending enqueues(1), pending inval(1)\n"
        "\tmetadata dirties(13), metadata cleans(1)\n"
        "\tmetadata batch(5) metadata ssd writes(9)\n"
        f"\tcleanings({device.get('cleanings', 0)}) fallow cleanings(0)\n"
        "\tno room(0) front merge(0) back merge(0)\n"
        "\tforce_clean_block(0)\n"
        "\tdisk reads(8), disk writes(1) ssd reads(255) ssd writes(33)\n"
        "\tuncached reads(2), uncached writes(0), uncached IO requeue(0)\n"
        "\tdisk read errors(0), disk write errors(0) ssd read errors(0) ssd write errors(0)\n"
        "\tuncached sequential reads(0), uncached sequential writes(0)\n"
        "\tpid_adds(0), pid_dels(0), pid_drops(0) pid_expiry(0)\n"
        "\tlru hot blocks(0), lru warm blocks(0)\n"
        "\tlru promotions(0), lru demotions(0)"
    )


# ---------------------------------------------------------------- flashcache utilities


def new_device(ssd: str, disk: str, dirty: int, control: dict) -> dict:
    return {
        "ssd": ssd,
        "disk": disk,
        "sectors": 20480000,
        "dirty": dirty + control["initial_dirty"],
        "cleaning_since": None,
        "sysctl": {
            "fast_remove": 0,
            "dirty_thresh_pct": 20,
            "reclaim_policy": 0,
            "skip_seq_thresh_kb": 0,
            "do_sync": 0,
            "stop_sync": 0,
        },
    }


def flashcache_create(args: list[str]) -> int:
    positional, options, i = [], {}, 0
    while i < len(args):
        if args[i] in ("-p", "-s", "-b", "-m"):
            options[args[i]] = args[i + 1]
            i += 2
        elif args[i] in ("-v", "-f"):
            options[args[i]] = True
            i += 1
        else:
            positional.append(args[i])
            i += 1
    if len(positional) != 3 or "-p" not in options:
        return fail(
            "Usage: flashcache_create [-v] -p back|thru|around [-s cache size] "
            "[-b block size] cachedevname ssd_devname disk_devname"
        )
    name, ssd, disk = positional
    with state() as data:
        ssds, devices = data["disk"]["ssds"], data["kernel"]["devices"]
        if ssd in ssds and "-f" not in options:
            return fail(
                f"flashcache_create: Valid Flashcache already exists on {ssd}\n"
                "flashcache_create: Use flashcache_destroy first and then create again "
            )
        if name in devices:
            return fail(f"device-mapper: create ioctl on {name} failed: Device or resource busy")
        log(["flashcache_create", *args])
        ssds[ssd] = {"name": name, "disk": disk, "dirty": 0}
        devices[name] = new_device(ssd, disk, 0, data["control"])
    print(f"cachedev {name}, ssd_devname {ssd}, disk_devname {disk} cache mode WRITE_BACK")
    return 0


def flashcache_load(args: list[str]) -> int:
    if not args:
        return fail("Usage: flashcache_load ssd_devname [cachedev_name]")
    ssd = args[0]
    with state() as data:
        meta = data["disk"]["ssds"].get(ssd)
        if meta is None:
            return fail(f"flashcache_load: Invalid Flashcache superblock {ssd}")
        name = args[1] if len(args) > 1 else meta["name"]
        devices = data["kernel"]["devices"]
        if name in devices:
            return fail(f"device-mapper: create ioctl on {name} failed: Device or resource busy")
        log(["flashcache_load", *args])
        devices[name] = new_device(ssd, meta["disk"], meta["dirty"], data["control"])
        meta["dirty"] = 0
    return 0


def sysctl(args: list[str]) -> int:
    keys = [a for a in args if not a.startswith("-")]
    if not keys or not all(k.split("=", 1)[0].startswith("dev.flashcache.") for k in keys):
        for real in ("/usr/sbin/sysctl", "/sbin/sysctl"):
            if os.path.exists(real):
                os.execv(real, [real, *args])
        return fail("sysctl: not found")
    status = 0
    with state() as data:
        devices, control = data["kernel"]["devices"], data["control"]
        by_sysctl = {
            f"{os.path.basename(d['ssd'])}+{os.path.basename(d['disk'])}": d
            for d in devices.values()
        }
        for key in keys:
            name, _, value = key.partition("=")
            parts = name.split(".")
            device = by_sysctl.get(parts[2]) if len(parts) == 4 else None
            if device is None or parts[3] not in device["sysctl"]:
                print(
                    f"sysctl: cannot stat /proc/sys/{name.replace('.', '/')}: "
                    "No such file or directory",
                    file=sys.stderr,
                )
                status = 255
                continue
            if not value:
                print(
                    device["sysctl"][parts[3]]
                    if "-n" in args
                    else f"{name} = {device['sysctl'][parts[3]]}"
                )
                continue
            log(["sysctl", "-w", key])
            device["sysctl"][parts[3]] = int(value)
            if parts[3] == "do_sync" and int(value):
                settle(device, control, cleaning=True)
                device["cleanings"] = device.get("cleanings", 0) + 1
            if "-n" not in args:
                print(f"{name} = {value}")
    return status


# ---------------------------------------------------------------- lvm


def lvs(args: list[str]) -> int:
    fields = args[args.index("-o") + 1].split(",") if "-o" in args else ["lv_full_name"]
    names = [a for a in args if "/" in a and not a.startswith("-")]
    with state() as data:
        control = data["control"]
        for name in names:
            lv = data["disk"]["lvs"].get(name)
            if lv is None:
                return fail(f'  Failed to find logical volume "{name}"', 5)
            cached = lv["segtype"] == "cache"
            values = {
                "lv_full_name": name,
                "segtype": lv["segtype"],
                "pool_lv": f"[{lv['pool'].split('/')[1]}_cpool]" if cached else "",
                "cache_mode": lv["mode"] if cached else "",
                "cache_policy": lv["policy"] if cached else "",
                "cache_dirty_blocks": str(dirty_now(lv, control)) if cached else "",
                "cache_used_blocks": str(control["total_blocks"] // 4) if cached else "",
                "cache_total_blocks": str(control["total_blocks"]) if cached else "",
            }
            print("  " + " ".join(f"LVM2_{f.upper()}='{values.get(f, '')}'" for f in fields))
    return 0


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def lvchange(args: list[str]) -> int:
    name = args[-1]
    policy = option(args, "--cachepolicy")
    with state() as data:
        lv = data["disk"]["lvs"].get(name)
        if lv is None:
            return fail(f'  Failed to find logical volume "{name}"', 5)
        if policy is None:
            return fail("fake lvchange: only --cachepolicy is modelled")
        if lv["segtype"] != "cache":
            return fail(f"  Command on LV {name} uses options invalid with LV type linear.", 3)
        log(["lvchange", *args])
        settle(lv, data["control"], cleaning=policy == "cleaner")
        lv["policy"] = policy
        lv["settings"] = option(args, "--cachesettings") or lv.get("settings", "")
    print(f"  Logical volume {name} changed.")
    return 0


def lvconvert(args: list[str]) -> int:
    name = args[-1]
    with state() as data:
        lvs_ = data["disk"]["lvs"]
        lv = lvs_.get(name)
        if lv is None:
            return fail(f'  Failed to find logical volume "{name}"', 5)
        if "--splitcache" in args:
            if lv["segtype"] != "cache":
                return fail(f"  Command on LV {name} does not accept LV type linear.", 3)
            log(["lvconvert", *args])
            settle(lv, data["control"], cleaning=True)
        elif option(args, "--type") == "cache":
            if lv["segtype"] == "cache":
                return fail(f"  Command on LV {name} does not accept LV type cache.", 3)
            log(["lvconvert", *args])
            lv.update(
                segtype="cache",
                pool=option(args, "--cachepool"),
                mode=option(args, "--cachemode") or "writethrough",
                policy=option(args, "--cachepolicy") or "smq",
                settings=option(args, "--cachesettings") or "",
                dirty=data["control"]["initial_dirty"],
                cleaning_since=None,
            )
            print(f"  Logical volume {name} is now cached.")
            return 0
        else:
            return fail("fake lvconvert: only --type cache and --splitcache are modelled")
    print(f"  Flushing cache for {name}.")
    wait_clean(name, lambda d: d["disk"]["lvs"][name])
    with state() as data:
        lv = data["disk"]["lvs"][name]
        lv.update(segtype="linear", dirty=0, cleaning_since=None)
        print(f"  Logical volume {name} is not cached and {lv['pool']} is unused.")
    return 0


# ---------------------------------------------------------------- unit-test stand-ins


def systemctl(args: list[str]) -> int:
    with state() as data:
        units = data["control"]["units"]
        if args[:1] == ["is-active"]:
            unit = args[-1]
            return 0 if units.get(unit) == "active" else 3
        if args[:1] == ["stop"]:
            log(["systemctl", *args])
            for unit in args[1:]:
                units[unit] = "inactive"
            control_path = DISK_DIR / "control.json"
            control_path.write_text(json.dumps(data["control"]))
            return 0
    return fail(f"fake systemctl: unsupported {args}")


def mountpoint(args: list[str]) -> int:
    with state() as data:
        return 0 if args[-1] in data["control"].get("mounted", []) else 32


def umount(args: list[str]) -> int:
    path = args[-1]
    with state() as data:
        control = data["control"]
        if path in control["busy"]:
            return fail(f"umount: {path}: target is busy.", 32)
        log(["umount", *args])
        control["mounted"] = [m for m in control.get("mounted", []) if m != path]
        (DISK_DIR / "control.json").write_text(json.dumps(control))
    return 0


PROGRAMS = {
    "dmsetup": dmsetup,
    "flashcache_create": flashcache_create,
    "flashcache_load": flashcache_load,
    "sysctl": sysctl,
    "lvs": lvs,
    "lvchange": lvchange,
    "lvconvert": lvconvert,
    "systemctl": systemctl,
    "mountpoint": mountpoint,
    "umount": umount,
}


def main() -> int:
    program = os.path.basename(sys.argv[0])
    if program not in PROGRAMS:
        return fail(f"fakedm: install me as one of {', '.join(PROGRAMS)}")
    return PROGRAMS[program](sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
