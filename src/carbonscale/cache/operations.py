"""What the cache verbs do: check, start at boot, and the safe halt."""

from __future__ import annotations

from collections.abc import Callable

from carbonscale import CarbonscaleError, ExitStatus
from carbonscale.cache.backends import Backend
from carbonscale.cache.parsers import CacheState


def check(backend: Backend) -> None:
    problems = backend.check()
    if problems:
        hint = (
            "flashcache is out of tree: build and install its kernel module (dkms) and utilities "
            "(flashcache_create, flashcache_load) from "
            "https://github.com/facebookarchive/flashcache, "
            "or use ssd_cache_backend: lvmcache"
            if backend.kind == "flashcache"
            else "install lvm2 and load dm-cache (a mainline kernel module)"
        )
        raise CarbonscaleError(
            f"{backend.kind} cannot work on this host: {'; '.join(problems)}. {hint}"
        )


def start(backend: Backend, create: bool = False) -> list[str]:
    """Bring the cache up before the whisper filesystem is mounted: wait for
    its devices, load (or with `create`, create/attach) it, apply its
    settings. Returns what changed (empty: it was already up as configured)."""
    deadline = backend.host.monotonic() + backend.config.device_wait
    missing = [p for p in backend.device_paths() if not backend.host.exists(p)]
    while missing and backend.host.monotonic() < deadline:
        backend.host.sleep(1)
        missing = [p for p in backend.device_paths() if not backend.host.exists(p)]
    if missing:
        raise CarbonscaleError(
            f"{backend.describe()}: device(s) {', '.join(missing)} did not appear within "
            f"{backend.config.device_wait:g} s"
        )
    return backend.start(create)


def halt(backend: Backend, log: Callable[[str], None]) -> int:
    """The safe-halt sequence; returns 0 when the cache was flushed and removed,
    1 when it was kept (busy filesystem, timeout, a failing command)."""
    config, host = backend.config, backend.host
    started = host.monotonic()
    deadline = started + config.timeout

    def left() -> float:
        return max(1.0, deadline - host.monotonic())

    def elapsed() -> float:
        return host.monotonic() - started

    log(
        f"safe halt of {backend.describe()} under {config.whisper_dir}: "
        f"timeout {config.timeout:g} s"
    )

    # 1. Whatever writes or reads whisper must be gone (at halt systemd has
    # stopped them already: this unit is ordered before them).
    active = [
        u for u in config.units if host.run(["systemctl", "is-active", "--quiet", u], timeout=30).ok
    ]
    if active:
        log(f"stopping {' '.join(active)}")
        stopped = host.run(["systemctl", "stop", *active], timeout=left())
        if not stopped.ok:
            log(f"ERROR: systemctl stop {' '.join(active)} failed ({stopped.why()})")
    still = [
        u for u in config.units if host.run(["systemctl", "is-active", "--quiet", u], timeout=30).ok
    ]
    if still:
        log(f"ERROR: still running: {' '.join(still)}")
    else:
        log(f"carbon instances stopped: {' '.join(config.units) or '(none configured)'}")

    # 2. sync, 3. unmount; a busy filesystem keeps the cache: flushing or
    # removing it under a mounted filesystem is how data gets lost.
    host.sync()
    log("sync done")
    if host.run(["mountpoint", "-q", config.whisper_dir], timeout=30).ok:
        unmounted = host.run(["umount", config.whisper_dir], timeout=left())
        if not unmounted.ok:
            holders = host.holders(config.whisper_dir)
            log(
                f"ERROR: cannot unmount {config.whisper_dir} ({unmounted.why()})"
                + (f"; held by {'; '.join(holders)}" if holders else "")
                + f". KEEPING the cache: {backend.describe()} is not flushed and not removed"
            )
            return ExitStatus.PROBLEM
        log(f"unmounted {config.whisper_dir}")
    else:
        log(f"{config.whisper_dir} is not mounted")

    before = backend.state()
    if not before.present:
        log(
            f"dirty blocks before flush: none, {backend.describe()} is not present; "
            "nothing to flush"
        )
        log(f"safe halt done in {elapsed():.1f} s")
        return ExitStatus.OK
    log(f"dirty blocks before flush: {before.describe()}")

    # 4. flush, watched and bounded.
    try:
        backend.begin_flush()
    except CarbonscaleError as exc:
        log(f"ERROR: cannot start the flush: {exc}")
        return _gave_up(backend, log, before, before, elapsed())
    log("flush started")
    state = backend.state()
    if state.present and state.dirty_blocks is None:
        log(f"ERROR: {backend.describe()} reports no dirty-block count")
        return _gave_up(backend, log, before, state, elapsed())
    while state.dirty_blocks and host.monotonic() < deadline:
        host.sleep(min(config.poll_interval, max(0.0, deadline - host.monotonic())))
        state = backend.state()
        log(f"flushing: {state.describe()} left after {elapsed():.1f} s")
    if state.dirty_blocks:
        log(
            f"TIMEOUT: {state.describe()} left after {elapsed():.1f} s "
            f"(limit {config.timeout:g} s, {before.dirty_blocks} before)"
        )
        return _gave_up(backend, log, before, state, elapsed())
    log(f"flushed: 0 dirty blocks after {elapsed():.1f} s")

    # 5. remove.
    removed = backend.remove(timeout=left())
    if not removed.ok:
        log(f"ERROR: removing {backend.describe()} failed ({removed.why()})")
        return _gave_up(backend, log, before, backend.state(), elapsed())
    after = backend.state()
    log(f"removed {backend.describe()}")
    log(
        f"safe halt done in {elapsed():.1f} s: dirty blocks before {before.dirty_blocks}, "
        f"after {after.dirty_blocks if after.present else 0}"
    )
    return ExitStatus.OK


def _gave_up(backend: Backend, log, before: CacheState, now: CacheState, seconds: float) -> int:
    gone = backend.on_timeout(log, now) if now.present else True
    log(
        f"safe halt INCOMPLETE after {seconds:.1f} s: dirty blocks before {before.dirty_blocks}, "
        f"left {now.dirty_blocks if now.present else 0}; cache "
        f"{'removed' if gone else 'still attached'}"
    )
    return ExitStatus.PROBLEM
