"""carbonscale: deploy and operate Graphite at very large scale.

Every computation (ring placement, whisper, relays, flap damping) lives once in
this package; the Ansible modules and filters in the project import it.
"""

__version__ = "0.1.0"


class CarbonscaleError(Exception):
    """Bad input or an operation that cannot proceed.

    The CLI prints the message on one line and exits 2; Ansible glue turns it
    into a module failure. Never raise it for a bug: bugs should traceback.
    """
