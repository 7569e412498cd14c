"""A Debian 12 virtual machine for the tests that need a real kernel.

The containers share a kernel without IPVS and device-mapper; tests marked
`vm` boot Debian's own kernel under qemu (scripts/vm-boot.sh) from the image
scripts/vm-image.sh builds once into .cache/vm, and drive the guest over SSH
(qemu's user network forwards a local port to the guest's sshd).

KVM is used when it boots the guest; where /dev/kvm exists but a KVM guest
hangs in early boot (seen on nested hosts) the first boot falls back to TCG
and the verdict is kept in .cache/vm/accel so later boots do not wait again.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VM_CACHE = Path(os.environ.get("VM_CACHE", REPO / ".cache" / "vm"))
BOOT_TIMEOUT = float(os.environ.get("CARBONSCALE_VM_BOOT_TIMEOUT", "600"))
# A tier's playbook in the emulated guest: half an hour on a busy 2-core host.
PLAYBOOK_TIMEOUT = float(os.environ.get("CARBONSCALE_VM_PLAYBOOK_TIMEOUT", "5400"))
# A KVM guest that works reaches sshd in seconds; one that hangs never does.
KVM_PROBE_TIMEOUT = 90.0
QEMU_PACKAGES = ("qemu-system-x86", "qemu-utils")


class QemuExited(RuntimeError):
    """qemu ended before the guest's sshd answered."""


def build_image() -> str:
    """Build (or reuse) the image; its recipe id."""
    if not shutil.which("qemu-system-x86_64") or not shutil.which("qemu-img"):
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *QEMU_PACKAGES],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )
    result = subprocess.run(
        [str(REPO / "scripts" / "vm-image.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return result.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VM:
    """One guest: its overlay disk, extra raw disks and serial log live in workdir."""

    def __init__(self, workdir: Path, recipe: str, extra_disks: dict[str, str] | None = None):
        self.workdir = workdir
        self.recipe = recipe
        self.overlay = workdir / "root.qcow2"
        self.disks = []
        for name, size in (extra_disks or {}).items():
            path = workdir / f"{name}.raw"
            if not path.exists():
                subprocess.run(["truncate", "-s", size, str(path)], check=True)
            self.disks.append(path)
        self.key = VM_CACHE / "id_ed25519"
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.boots = 0

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    @property
    def control_path(self) -> str:
        return f"{self.workdir}/ssh-%p"

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"serial-{self.boots}.log"

    def _accel(self) -> str:
        forced = os.environ.get("CARBONSCALE_VM_ACCEL")
        if forced:
            return forced
        verdict = VM_CACHE / "accel"
        if verdict.exists():
            return verdict.read_text().strip()
        return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"

    def cpu_seconds(self) -> float:
        """Host CPU time qemu has used so far: what a boot or a step costs,
        whatever share of the CPU the host gave it (the wall time varies
        several-fold with the host's load, this does not)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def boot(self) -> float:
        """Boot and wait for sshd; the seconds it took (self.boot_cpu: qemu's CPU seconds)."""
        accel = self._accel()
        probing = accel == "kvm" and not (VM_CACHE / "accel").exists()
        started = time.monotonic()
        self._start(accel)
        try:
            self._wait_ssh(KVM_PROBE_TIMEOUT if probing else BOOT_TIMEOUT)
        except (TimeoutError, QemuExited) as failure:
            if not probing:
                raise
            # KVM is there but the guest does not boot under it (hangs, or
            # qemu aborts setting the guest's MSRs): TCG from now on.
            print(f"KVM does not boot the guest here, TCG from now on: {failure}")
            self.kill()
            (VM_CACHE / "accel").write_text("tcg\n")
            self._start("tcg")
            self._wait_ssh(BOOT_TIMEOUT)
        else:
            if probing:
                (VM_CACHE / "accel").write_text("kvm\n")
        self.boot_cpu = self.cpu_seconds()
        return time.monotonic() - started

    def _start(self, accel: str) -> None:
        self.boots += 1
        self.port = free_port()
        argv = [str(REPO / "scripts" / "vm-boot.sh"), "-r", self.recipe, "-o", str(self.overlay)]
        argv += ["-p", str(self.port), "-l", str(self.serial_log), "-a", accel]
        for disk in self.disks:
            argv += ["-x", str(disk)]
        self.accel = accel
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def _wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise QemuExited(
                    f"qemu exited ({self.process.returncode}): {self.process.stderr.read()!r}; "
                    f"serial console:\n{self.console_tail()}"
                )
            # qemu accepts the forwarded connection at once; until sshd runs
            # in the guest the SSH handshake just waits.
            try:
                probe = self.ssh("true", timeout=60, check=False, connect_timeout=30)
            except subprocess.TimeoutExpired:
                continue
            if probe.returncode == 0:
                # The master, in the background without our pipes (a master
                # holding them would block every subprocess.run on it).
                subprocess.run(
                    self.ssh_argv(master=True),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=300,
                    check=True,
                )
                return
            time.sleep(2)
        raise TimeoutError(
            f"no sshd in the guest after {timeout:g} s ({self.accel}); serial console:\n"
            + self.console_tail()
        )

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no serial log)"
        return "\n".join(text.splitlines()[-lines:])

    def ssh_argv(self, connect_timeout: int = 180, master: bool = False) -> list[str]:
        # The master: a background connection (-f) that runs nothing (-N).
        master_options = ["-o", "ControlPersist=yes", "-N", "-f"] if master else []
        return [
            "ssh",
            "-i",
            str(self.key),
            "-p",
            str(self.port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            # Commands share the master connection _wait_ssh opens: under
            # TCG each new handshake (sshd's fork and re-exec) costs seconds.
            "-o",
            f"ControlMaster={'yes' if master else 'no'}",
            *master_options,
            "-o",
            f"ControlPath={self.control_path}",
            "root@127.0.0.1",
        ]

    def ssh(
        self,
        command: str,
        timeout: float = 300,
        check: bool = True,
        input: str | None = None,
        connect_timeout: int = 180,
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self.ssh_argv(connect_timeout), command],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the guest: {command!r} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def out(self, command: str, timeout: float = 300) -> str:
        return self.ssh(command, timeout=timeout).stdout

    def copy_in(self, source: Path, dest: str) -> None:
        self.ssh(f"cat > {shlex.quote(dest)}", input=source.read_text())

    def poweroff(self, timeout: float = 900) -> float:
        """`systemctl poweroff` in the guest; wait for qemu to exit. Seconds taken."""
        started = time.monotonic()
        self.ssh("systemctl --no-block poweroff", timeout=60, check=False)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the guest did not power off within {timeout} s; serial console:\n"
                + self.console_tail()
            ) from None
        return time.monotonic() - started

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def connection_vars(vm: VM) -> dict:
    """Inventory variables that reach the guest's sshd through qemu's forward,
    over the master connection the harness opened at boot (a new handshake
    costs seconds under TCG; Ansible pipelines its modules, ansible.cfg)."""
    return {
        "ansible_host": "127.0.0.1",
        "ansible_port": vm.port,
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(vm.key),
        "ansible_ssh_args": (
            f"-o ControlMaster=auto -o ControlPersist=yes -o ControlPath={vm.control_path}"
        ),
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/usr/bin/python3",
    }


def run_playbook(workdir: Path, inventory: dict, playbooks: list[str]) -> None:
    """ansible-playbook PLAYBOOKS (relative to the repository) in one run over
    INVENTORY. Its output streams to workdir/ansible-*.log (each task's time
    by profile_tasks: where an emulated guest spends it), so a run that is
    slow can be watched and one that is killed keeps what it did; fails the
    test with the end of the log; prints the recap and the slowest tasks."""
    stem = "-".join(Path(playbook).stem for playbook in playbooks)
    path = workdir / f"inventory-{stem}.json"
    path.write_text(json.dumps(inventory))
    log = workdir / f"ansible-{stem}.log"
    bin_dir = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["ANSIBLE_CALLBACKS_ENABLED"] = "ansible.posix.profile_tasks"
    env["PROFILE_TASKS_TASK_OUTPUT_LIMIT"] = "12"
    started = time.monotonic()
    with log.open("w") as out:
        run = subprocess.Popen(
            [str(bin_dir / "ansible-playbook"), "-i", str(path)]
            + [str(REPO / playbook) for playbook in playbooks],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            returncode = run.wait(timeout=PLAYBOOK_TIMEOUT)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
            returncode = None
    text = log.read_text(errors="replace")
    took = time.monotonic() - started
    assert returncode is not None, f"{log}: no end after {took:.0f} s:\n{text[-4000:]}"
    recap = text[text.rfind("PLAY RECAP") :].strip()
    print(f"{' '.join(playbooks)} on the VM: {took:.0f} s\n{recap}")
    assert returncode == 0, text[-8000:]
