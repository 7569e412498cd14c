"""The host: every program run and every clock read goes through here, so tests
put fake programs first in PATH and run this same code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def why(self) -> str:
        if self.timed_out:
            return "timed out"
        message = (self.stderr or self.stdout).strip().splitlines()
        return f"exit {self.returncode}" + (f": {message[-1]}" if message else "")


class Host:
    """Runs programs with a bounded wait. A program stuck in the kernel (a
    `dmsetup remove` writing back a huge cache) cannot be killed; on timeout
    it is sent SIGKILL and abandoned, never waited for without a bound."""

    def run(self, argv: list[str], timeout: float | None = None) -> Result:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except FileNotFoundError:
            return Result(127, "", f"{argv[0]}: command not found")
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                out, err = proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                out, err = "", ""
            return Result(-9, out or "", err or "", timed_out=True)
        return Result(proc.returncode, out, err)

    def which(self, program: str) -> str | None:
        return shutil.which(program)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def sync(self) -> None:
        os.sync()

    def holders(self, path: str) -> list[str]:
        """Processes with a file, cwd or root under `path` (why an unmount is busy)."""
        prefix = path.rstrip("/") + "/"
        found = []
        for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
            uses = []
            for link in ("cwd", "root"):
                target = _readlink(f"/proc/{pid}/{link}")
                if target and (target == path or target.startswith(prefix)):
                    uses.append(link)
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                fds = []
            if any(
                (t := _readlink(f"/proc/{pid}/fd/{fd}")) and (t == path or t.startswith(prefix))
                for fd in fds
            ):
                uses.append("open files")
            if uses:
                found.append(f"pid {pid} ({_comm(pid)}): {', '.join(uses)}")
        return found


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
