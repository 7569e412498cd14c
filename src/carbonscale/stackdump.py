"""Every thread's Python stack on a signal, for carbonscale's daemons.

A daemon that hangs (a deadlock between threads, a thread stuck in a socket
call) shows nothing in its logs; its stacks show where each thread waits.
faulthandler dumps them from a C signal handler, so it works even when no
Python code can run (the main thread blocked in a lock with the GIL held), and
writes them to stderr, which systemd hands to the journal. `carbonscale ops
stacks` sends the signal and reads the dump back from the journal.

The signal is SIGUSR2: carbon-cache (roles/carbon_storage's launcher
registers the same handler) ignores SIGHUP and twistd takes SIGUSR1 to rotate
its log file, SIGTERM and SIGINT to stop; SIGUSR2 is twistd's only under
`twistd --debug` (a pdb prompt), which no unit runs. carbonscale's daemons
handle SIGTERM and SIGINT only. A process without the handler dies of
SIGUSR2, so `ops stacks` checks that the handler is there before it sends it.

faulthandler writes no end to its dump. So a Python handler, which
faulthandler calls after the dump (chain=True), writes END_MARKER: a reader
knows the dump is whole when it sees it. Python runs that handler in the main
thread at its next bytecode (a blocked lock.acquire or select returns for it);
a main thread stuck in C never writes it, and the reader says so.
"""

from __future__ import annotations

import sys

# By name: `signal` is imported only where a signal is sent or handled, not on
# every start of the CLI.
STACK_SIGNAL_NAME = "SIGUSR2"
END_MARKER = "-- end of stack dump --"

# The verbs systemd runs as long-lived services (their roles' units); the CLI
# installs the handler for these only, once, before the verb runs. A name is
# "module:function" of the verb's `func`; tests/test_stacks.py checks that
# each one is still a verb's func of the CLI.
DAEMON_VERBS = frozenset(
    {
        "carbonscale.commands.relay:run_pickle",  # carbonscale-pickle-relay
        "carbonscale.commands.relay:run_statsd",  # carbonscale-statsd-relay
        "carbonscale.commands.health:run_pool",  # carbonscale-lvs-pool
        "carbonscale.commands.migrate:run_serve",  # carbonscale-migrate-serve
    }
)


def stack_signal():
    import signal

    return signal.Signals[STACK_SIGNAL_NAME]


def verb_name(func) -> str:
    return f"{func.__module__}:{func.__qualname__}"


def install(file=None) -> None:
    """Dump every thread's stack to file (default stderr) on the stack signal,
    then END_MARKER. Call it from the main thread (signal.signal's rule).

    Forked children (the statsd relay's workers) inherit the handlers."""
    import faulthandler
    import os
    import signal

    out = file or sys.stderr
    fd = out.fileno()
    end = f"{END_MARKER}\n".encode()
    signal.signal(stack_signal(), lambda signum, frame: os.write(fd, end))
    faulthandler.register(stack_signal(), file=out, all_threads=True, chain=True)


def install_for_daemon(func) -> bool:
    """install() when func is a daemon verb's; True when it did."""
    if verb_name(func) not in DAEMON_VERBS:
        return False
    install()
    return True
