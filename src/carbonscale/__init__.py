"""carbonscale: deploy and operate Graphite at very large scale.

Every computation (ring placement, whisper, relays, flap damping) lives once in
this package; the Ansible modules and filters in the project import it.
"""

from enum import IntEnum

__version__ = "0.1.0"


class ExitStatus(IntEnum):
    """Exit codes of `carbonscale` and its daemons, one list for every command."""

    OK = 0
    # The operation ran and found a problem: a missing point, a skipped file,
    # a server that is down, a cache left attached.
    PROBLEM = 1
    # Bad input or usage: a CarbonscaleError (argparse exits 2 as well).
    USAGE = 2
    # SIGINT (128 + 2), as shells report it.
    INTERRUPTED = 130


class CarbonscaleError(Exception):
    """Bad input or an operation that cannot proceed.

    The CLI prints the message on one line and exits ExitStatus.USAGE (2); Ansible glue turns it
    into a module failure. Never raise it for a bug: bugs should traceback.
    """
