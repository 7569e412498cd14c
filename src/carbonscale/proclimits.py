"""Open-file limits of running processes, read from /proc.

The directors' nginx asks for `worker_rlimit_nofile`; a worker that did not
get it keeps the limit it was started with (1,024 under a plain systemd unit)
and refuses clients with EMFILE while keepalived's checks stay green. Two
checks make the deploy fail instead, saying why:

- `ceiling_problem`: can the service manager (PID 1) grant a LimitNOFILE at
  all? Without CAP_SYS_RESOURCE (a container) it cannot go above its own hard
  limit, and the unit would fail to start with status 205/LIMITS.
- `nginx_nofile_problems`: did every nginx worker get the limit?
"""

from __future__ import annotations

import os

from carbonscale import CarbonscaleError

CAP_SYS_RESOURCE = 24
PROC = "/proc"


def open_files_limit(pid: int, proc: str = PROC) -> tuple[int | None, int | None]:
    """(soft, hard) `Max open files` of a process; None stands for unlimited."""
    try:
        with open(f"{proc}/{pid}/limits", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("Max open files"):
                    soft, hard = line[len("Max open files") :].split()[:2]
                    return (
                        None if soft == "unlimited" else int(soft),
                        None if hard == "unlimited" else int(hard),
                    )
    except OSError as exc:
        raise CarbonscaleError(f"cannot read the limits of process {pid}: {exc.strerror}") from exc
    raise CarbonscaleError(f"{proc}/{pid}/limits has no 'Max open files' line")


def has_capability(pid: int, capability: int, proc: str = PROC) -> bool:
    """Whether a process holds `capability` in its effective set."""
    try:
        with open(f"{proc}/{pid}/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> capability & 1)
    except OSError as exc:
        raise CarbonscaleError(f"cannot read the status of process {pid}: {exc.strerror}") from exc
    return False


def children(pid: int, proc: str = PROC) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", encoding="utf-8") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def ceiling_problem(need: int, pid: int = 1, proc: str = PROC) -> str | None:
    """Why the service manager `pid` cannot give a unit LimitNOFILE=need; None if it can."""
    _, hard = open_files_limit(pid, proc)
    if hard is None or need <= hard or has_capability(pid, CAP_SYS_RESOURCE, proc):
        return None
    return (
        f"the service manager (pid {pid}) can grant at most {hard} open files (its hard "
        f"limit; it lacks CAP_SYS_RESOURCE, as in a container) but nginx needs {need}: "
        "raise the host's or container's nofile limit, or lower "
        "lvs_director_nginx_worker_connections"
    )


def nginx_nofile_problems(pidfile: str, need: int, proc: str = PROC) -> tuple[list[int], list[str]]:
    """(workers, problems): every worker of the nginx master in `pidfile` whose
    soft open-files limit is below `need`, one message each."""
    try:
        with open(pidfile, encoding="utf-8") as handle:
            master = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise CarbonscaleError(f"cannot read nginx's master pid from {pidfile}: {exc}") from exc
    workers = children(master, proc)
    if not workers:
        return [], [f"nginx master {master} has no worker processes"]
    problems = []
    for worker in workers:
        soft, _ = open_files_limit(worker, proc)
        if soft is not None and soft < need:
            problems.append(
                f"nginx worker {worker} may open {soft} files but worker_rlimit_nofile asks "
                f"for {need}: its setrlimit failed (see nginx's error log); the unit needs "
                "LimitNOFILE at least that high"
            )
    return workers, problems
