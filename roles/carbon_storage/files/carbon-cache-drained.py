#!/usr/bin/python3
"""carbon-cache (Debian's graphite-carbon 1.1.7) that writes its cache out at stop.

carbon's writer thread loops `while reactor.running: write the cache; sleep 1`.
At SIGTERM the reactor stops, the thread wakes from its sleep, sees it stopped
and returns: every point received in the last second before the stop is lost
(measured here: all 50 points sent just before `systemctl restart`). This
launcher runs carbon exactly as /usr/bin/carbon-cache does, plus one
shutdown trigger in the reactor's last phase ("after"), when the listeners are
closed and the writer thread has been joined: a final pass of carbon's own
writeCachedDataPoints() over what is left in the cache.

It also dumps every thread's Python stack to stderr on SIGUSR2 (see below).

Same arguments as /usr/bin/carbon-cache.
"""

import faulthandler
import importlib.abc
import importlib.util
import os
import signal
import sys

# Every thread's stack (the writer thread's writeForever among them) on
# SIGUSR2, for `carbonscale ops stacks --instance NAME`. SIGUSR2 because carbon
# ignores SIGHUP and twistd takes SIGUSR1 (log rotation), SIGTERM and SIGINT;
# twistd binds SIGUSR2 only under its own --debug, which the unit does not
# pass. The same signal as carbonscale's daemons (carbonscale.stackdump).
# faulthandler writes from a C signal handler, so a deadlocked carbon dumps
# too. The Python handler it chains to ends the dump with the marker `ops
# stacks` waits for (carbonscale.stackdump.install does the same). Registered
# before twistd starts; the unit runs it with --nodaemon, so fd 2 stays
# systemd's journal stream.
signal.signal(signal.SIGUSR2, lambda signum, frame: os.write(2, b"-- end of stack dump --\n"))
faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True, chain=True)


def _drain_at_shutdown(writer) -> None:
    # carbon.writer is imported after twistd installed its reactor.
    from twisted.internet import reactor

    def write_what_is_left():
        left = writer.MetricCache().size
        writer.writeCachedDataPoints()
        writer.log.msg(f"carbonscale: wrote the {left} datapoints left in the cache at shutdown")

    reactor.addSystemEventTrigger("after", "shutdown", write_what_is_left)


class _PatchWriterOnImport(importlib.abc.MetaPathFinder):
    """Runs _drain_at_shutdown on carbon.writer right after carbon imports it."""

    def find_spec(self, name, path, target=None):
        if name != "carbon.writer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _drain_at_shutdown(module)

        spec.loader.exec_module = exec_then_patch
        return spec


sys.meta_path.insert(0, _PatchWriterOnImport())

from carbon.exceptions import CarbonConfigException  # noqa: E402
from carbon.util import run_twistd_plugin  # noqa: E402

try:
    # The plugin is named after the script: run as carbon-cache.
    run_twistd_plugin("/usr/bin/carbon-cache")
except CarbonConfigException as exc:
    raise SystemExit(str(exc)) from None
