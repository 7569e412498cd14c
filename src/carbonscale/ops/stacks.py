"""Every thread's Python stack of a running carbon-cache instance or carbonscale
daemon on this host, read back from its journal.

The daemons dump their stacks to stderr on a signal (carbonscale.stackdump;
carbon-cache through roles/carbon_storage's launcher), and systemd gives their
stderr to the journal. Here: find the unit's main process, check that it
handles the signal (without the handler the signal kills it), note the
journal's position, send the signal through a pidfd (a restart in between
cannot turn it on another process), and read the unit's new journal lines
until the dump is complete.

The dump is whole at its END_MARKER (carbonscale.stackdump). A main thread
stuck in C never writes the marker; then the dump (faulthandler writes it at
once, from its signal handler) is taken as whole once the process's lines stop
coming for `quiet` seconds, and said to be possibly cut.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping

from carbonscale import CarbonscaleError
from carbonscale.stackdump import END_MARKER, STACK_SIGNAL_NAME, stack_signal
from carbonscale.storage import INSTANCE_NAME

CARBON_CACHE_UNIT = "carbon-cache@{}.service"
# Where roles/carbon_storage writes each instance's [cache:NAME] section.
CARBON_CONF = "/etc/carbon/carbon.conf"
# carbonscale's own daemons (their roles' units); without --instance or --unit
# every one of these and every carbon-cache instance that runs is dumped.
DAEMON_UNITS = (
    "carbonscale-pickle-relay.service",
    "carbonscale-statsd-relay.service",
    "carbonscale-lvs-pool.service",
    "carbonscale-migrate-serve.service",
)

# faulthandler's lines: a header per thread (newest thread first, the one that
# ran the handler marked Current), then its frames, innermost first.
THREAD_HEADER = re.compile(
    r"^(?:(?P<current>Current thread|Thread) (?P<id>0x[0-9a-fA-F]+)|Stack)"
    r"(?: \[[^\]]*\])? \(most recent call first\):$"
)
FRAME = re.compile(r'^  File "(?P<file>.*)", line (?P<line>\d+|\?\?\?) in (?P<function>.*)$')
POLL_SECONDS = 0.2


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    except FileNotFoundError:
        raise CarbonscaleError(
            f"{argv[0]} not found: stacks needs systemd (its units and journal)"
        ) from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise CarbonscaleError(f"{' '.join(argv[:2])}: {why}")
    return done.stdout


def configured_instances(carbon_conf: str = CARBON_CONF) -> list[str] | None:
    """The instances of carbon.conf's [cache:NAME] sections; None without the file."""
    import configparser

    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        with open(carbon_conf) as conf:
            parser.read_file(conf)
    except FileNotFoundError:
        return None
    except (OSError, configparser.Error) as exc:
        raise CarbonscaleError(f"cannot read {carbon_conf}: {exc}") from None
    return [s.partition(":")[2] for s in parser.sections() if s.startswith("cache:")]


def instance_unit(name: str, carbon_conf: str = CARBON_CONF) -> str:
    """carbon-cache@NAME.service, for an instance carbon.conf has (systemd alone
    cannot tell: any name instantiates the template unit)."""
    if not INSTANCE_NAME.match(name):
        raise CarbonscaleError(
            f"{name!r} is not a carbon-cache instance name (letters, digits, _ and -)"
        )
    instances = configured_instances(carbon_conf)
    if instances is not None and name not in instances:
        raise CarbonscaleError(
            f"no carbon-cache instance {name!r} here: {carbon_conf} has "
            f"{', '.join(instances) or 'none'}"
        )
    return CARBON_CACHE_UNIT.format(name)


def known_unit(unit: str) -> str:
    """The unit's full name, if it is one whose daemon has the handler: another
    daemon may take SIGUSR2 for something else (journald rotates its files)."""
    name = unit if unit.endswith(".service") else f"{unit}.service"
    instance = name.removeprefix("carbon-cache@").removesuffix(".service")
    if name.startswith("carbon-cache@") and INSTANCE_NAME.match(instance):
        return name
    if name in DAEMON_UNITS:
        return name
    known = ", ".join(u.removesuffix(".service") for u in DAEMON_UNITS)
    raise CarbonscaleError(
        f"{unit} is not a unit with the stack-dump handler: carbon-cache@NAME or {known}"
    )


def running_units() -> list[str]:
    """The carbon-cache instances and carbonscale daemons running here."""
    out = _run(["systemctl", "list-units", "--type=service", "--state=running",
                "--no-legend", "--plain", "--", CARBON_CACHE_UNIT.format("*"),
                *DAEMON_UNITS])  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unit_state(unit: str) -> dict[str, str]:
    out = _run(["systemctl", "show", "-p", "Id", "-p", "LoadState", "-p", "ActiveState",
                "-p", "SubState", "-p", "MainPID", "--", unit])  # fmt: skip
    return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)


def main_process(unit: str) -> tuple[str, int]:
    """(the unit's full name, its main PID), or why there is none."""
    state = unit_state(unit)
    name = state.get("Id") or unit
    if state.get("LoadState") == "not-found":
        raise CarbonscaleError(f"no unit {name} on this host")
    pid = int(state.get("MainPID") or 0)
    if state.get("ActiveState") != "active" or pid == 0:
        raise CarbonscaleError(
            f"{name} is not running ({state.get('ActiveState')}/{state.get('SubState')})"
        )
    return name, pid


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for signum (SigCgt of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except FileNotFoundError:
        return False
    return False


class Target:
    """One unit's main process, held by a pidfd from the check to the signal."""

    def __init__(self, unit: str) -> None:
        self.unit, self.pid = main_process(unit)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise CarbonscaleError(f"{self.unit} (pid {self.pid}) has just exited") from None
        try:
            # The pidfd holds the process that was the main one when the
            # unit was asked, unless it had already been replaced: ask again.
            if main_process(unit)[1] != self.pid:
                raise CarbonscaleError(f"{self.unit} restarted while it was checked: run again")
            if not catches(self.pid, stack_signal()):
                raise CarbonscaleError(
                    f"{self.unit} (pid {self.pid}) has no {STACK_SIGNAL_NAME} handler, the "
                    "signal would kill it (a launcher or carbonscale older than stack dumps?)"
                )
        except BaseException:
            os.close(self.pidfd)
            raise

    def signal(self) -> None:
        import signal

        try:
            signal.pidfd_send_signal(self.pidfd, stack_signal())
        finally:
            os.close(self.pidfd)


def journal_cursor() -> str:
    """The journal's current end."""
    out = _run(["journalctl", "--lines=0", "--show-cursor", "--no-pager"])
    for line in out.splitlines():
        if line.startswith("-- cursor: "):
            return line.removeprefix("-- cursor: ")
    raise CarbonscaleError("journalctl gave no cursor: is systemd-journald running?")


class JournalReader:
    """A process's new lines in its unit's journal, from a cursor on.

    journalctl --after-cursor with field matches (systemd 252) skips the first
    matching entry when the cursor's own entry does not match; --cursor
    includes the cursor's entry when it matches, and it is dropped here."""

    def __init__(self, unit: str, pid: int, cursor: str) -> None:
        self.matches = [f"_SYSTEMD_UNIT={unit}", f"_PID={pid}"]
        self.cursor = cursor

    def __call__(self) -> list[str]:
        out = _run(["journalctl", "--no-pager", "--output=json", f"--cursor={self.cursor}",
                    *self.matches])  # fmt: skip
        lines = []
        for row in out.splitlines():
            entry = json.loads(row)
            if entry["__CURSOR"] == self.cursor:
                continue
            self.cursor = entry["__CURSOR"]
            message = entry.get("MESSAGE")
            if isinstance(message, list):  # not UTF-8: journald's byte array
                message = bytes(message).decode(errors="replace")
            if isinstance(message, str):
                lines.append(message)
        return lines


def is_dump_line(text: str) -> bool:
    return not text or text.startswith("  ") or text == "..." or bool(THREAD_HEADER.match(text))


def collect_dump(
    read: Callable[[], list[str]],
    timeout: float,
    quiet: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[str], bool] | None:
    """(the dump's lines, whether it ended with END_MARKER) among read()'s new
    lines: from the first thread header on, to the marker, or else until
    `quiet` seconds pass without a line; None when no header came within
    `timeout`. The process's other lines are left out."""
    lines: list[str] = []
    started = False
    deadline = clock() + timeout
    newest = deadline
    while True:
        now = clock()
        for text in read():
            started = started or bool(THREAD_HEADER.match(text))
            if started and text == END_MARKER:
                return _trimmed(lines), True
            if started and is_dump_line(text):
                lines.append(text)
                newest = now
        if started and (now - newest >= quiet or now >= deadline + quiet):
            return _trimmed(lines), False
        if not started and now >= deadline:
            return None
        sleep(POLL_SECONDS)


def _trimmed(lines: list[str]) -> list[str]:
    while lines and not lines[-1]:
        lines.pop()
    return lines


def parse_dump(lines: list[str]) -> list[dict]:
    """[{id, current, frames: [{file, line, function}]}], in the dump's order."""
    threads: list[dict] = []
    for text in lines:
        header = THREAD_HEADER.match(text)
        if header:
            threads.append(
                {
                    "id": header["id"],
                    "current": header["current"] == "Current thread",
                    "frames": [],
                }
            )
            continue
        frame = FRAME.match(text)
        if frame and threads:
            line = frame["line"]
            threads[-1]["frames"].append(
                {
                    "file": frame["file"],
                    "line": int(line) if line.isdigit() else None,
                    "function": frame["function"],
                }
            )
    return threads


def stacks_here(
    instances: list[str],
    units: list[str],
    timeout: float = 10.0,
    quiet: float = 1.0,
    carbon_conf: str = CARBON_CONF,
) -> dict:
    """{"units": [{unit, pid, threads, lines} or {unit, error}]}.

    Named instances and units must be running with the handler (else a
    CarbonscaleError before any signal is sent); with neither, every running
    carbon-cache instance and carbonscale daemon is dumped, and one that cannot
    be is reported with the reason."""
    named = [instance_unit(name, carbon_conf) for name in instances]
    named += [known_unit(unit) for unit in units]
    report: list[dict] = []
    targets: list[Target] = []
    try:
        for unit in dict.fromkeys(named or running_units()):
            try:
                targets.append(Target(unit))
            except CarbonscaleError as exc:
                if named:
                    raise
                report.append({"unit": unit, "error": str(exc)})
        if not targets and not report:
            raise CarbonscaleError("no carbon-cache instance or carbonscale daemon runs here")
        cursor = journal_cursor() if targets else ""
    except BaseException:
        for target in targets:
            os.close(target.pidfd)
        raise
    for target in targets:
        target.signal()
    for target in targets:
        entry: dict = {"unit": target.unit, "pid": target.pid}
        dump = collect_dump(JournalReader(target.unit, target.pid, cursor), timeout, quiet)
        if dump is None:
            entry["error"] = (
                f"{target.unit} (pid {target.pid}): no stack dump in its journal within "
                f"{timeout:g} s "
                "(is its stderr the journal?)"
            )
        else:
            entry["lines"], entry["complete"] = dump
            entry["threads"] = parse_dump(entry["lines"])
        report.append(entry)
    return {"units": report}


def stack_errors(answers: Mapping[str, dict]) -> list[str]:
    """One line per unit whose dump did not come."""
    return [
        f"{host + ': ' if host else ''}{unit['error']}"
        for host, answer in answers.items()
        for unit in answer["units"]
        if "error" in unit
    ]


def stacks_table(answers: Mapping[str, dict]) -> str:
    """Each unit's dump under a header naming host, unit, pid and thread count."""
    out: list[str] = []
    for host, answer in answers.items():
        for unit in answer["units"]:
            if "error" in unit:
                continue
            where = f"{host}: " if host else ""
            count = len(unit["threads"])
            out.append(f"== {where}{unit['unit']} (pid {unit['pid']}), {count} threads ==")
            out.extend(unit["lines"])
            if not unit.get("complete", True):
                out.append(
                    "(no end marker: the main thread ran no Python code since the signal, "
                    "the dump may be cut)"
                )
            out.append("")
    return "\n".join(out).rstrip("\n")
