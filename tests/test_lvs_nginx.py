"""The directors' userspace data path under descriptor pressure (issue 19, item 1).

A real nginx (stream module) proxies to a real carbon-c-relay on this
machine. nginx started with a low hard open-files limit and without
CAP_SYS_RESOURCE (as systemd gives it in a container without LimitNOFILE)
reproduces the lab's failure: its workers' setrlimit fails, idle clients use
up the descriptors, and nginx still accepts but closes every new client. A
plain connect check says up; `carbonscale health path` and
`carbonscale lvs nofile` say what is wrong. keepalived's track script reads
the pool daemon's verdict; it is rendered from the role and run here.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ansible_runner import ROOT, role_vars_task, run_playbook
from relay_oracle import needs_relay
from relay_sinks import free_port, running_relay, wait_for
from test_lvs import KEEPALIVED, needs_keepalived

from carbonscale.health import proxied_path, tcp_connect
from carbonscale.lvs import keepalived_config_test
from carbonscale.lvs_pool import Pool
from carbonscale.proclimits import ceiling_problem, nginx_nofile_problems, open_files_limit

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
needs_nginx = pytest.mark.skipif(
    not (os.path.exists(NGINX) and os.path.exists(STREAM_MODULE)),
    reason="nginx with the stream module is not installed (make host-deps)",
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="nginx's workers change user: root")
CLI = [sys.executable, "-m", "carbonscale"]


def no_sys_resource(argv: list[str]) -> list[str]:
    """argv run without CAP_SYS_RESOURCE: limits cannot be raised past the hard one."""
    return ["setpriv", "--bounding-set", "-sys_resource", "--inh-caps", "-sys_resource", *argv]


@contextlib.contextmanager
def running_nginx(tmp_path: Path, listen: int, upstream: int, rlimit: int, hard: int | None):
    """nginx proxying 127.0.0.1:listen to 127.0.0.1:upstream; one worker asking
    for worker_rlimit_nofile rlimit, started with hard open-files limit `hard`
    and without CAP_SYS_RESOURCE."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
load_module {STREAM_MODULE};
daemon off;
master_process on;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
worker_rlimit_nofile {rlimit};
events {{ worker_connections 4096; }}
stream {{
    upstream relays {{ server 127.0.0.1:{upstream}; }}
    proxy_connect_timeout 1s;
    server {{ listen 127.0.0.1:{listen}; proxy_pass relays; proxy_timeout 10m; }}
}}
"""
    )

    def limit():
        if hard is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    proc = subprocess.Popen(
        no_sys_resource([NGINX, "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"]),
        preexec_fn=limit,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pidfile = tmp_path / "nginx.pid"
        assert wait_for(lambda: pidfile.exists() and tcp_connect("127.0.0.1", listen, 0.2), 10), (
            (tmp_path / "error.log").read_text()
            if (tmp_path / "error.log").exists()
            else "nginx did not start"
        )
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def relay(tmp_path):
    """A real carbon-c-relay that blackholes what it gets, past its start.

    carbon-c-relay 3.7.3 segfaults now and then when a client connects in
    its first fraction of a second (measured here: about 1 start in 10 with
    running_relay's readiness probe); a relay that died so is started again,
    it is not what these tests are about.
    """
    config = tmp_path / "relay.conf"
    config.write_text("match * send to blackhole stop;\n")
    for _ in range(5):
        port = free_port()
        with running_relay(["-f", str(config), "-p", str(port), "-w", "1"], port) as proc:
            time.sleep(1.0)
            if proc.poll() is None:
                yield port
                return
    pytest.fail("carbon-c-relay died after its start five times")


@needs_relay
@needs_nginx
@needs_root
def test_path_through_nginx_to_a_live_relay(tmp_path, relay):
    listen = free_port()
    with running_nginx(tmp_path, listen, relay, rlimit=4096, hard=8192):
        ok, why = proxied_path("127.0.0.1", listen)
        assert (ok, why) == (True, "proxied to a relay and closed cleanly")
        cli = subprocess.run([*CLI, "health", "path", "127.0.0.1", str(listen)])
        assert cli.returncode == 0
        # The worker got what it asked for, and the deploy's check says so.
        workers, problems = nginx_nofile_problems(str(tmp_path / "nginx.pid"), 4096)
        assert len(workers) == 1 and problems == []
        assert open_files_limit(workers[0]) == (4096, 4096)


@needs_relay
@needs_nginx
@needs_root
def test_path_fails_when_nginx_reaches_no_relay(tmp_path, relay):
    listen = free_port()
    with running_nginx(tmp_path, listen, free_port(), rlimit=4096, hard=8192):
        assert tcp_connect("127.0.0.1", listen)  # nginx accepts ...
        ok, why = proxied_path("127.0.0.1", listen)  # ... and closes at once
        assert not ok and why.startswith("closed by the proxy within 0.3 s"), why


@needs_relay
@needs_nginx
@needs_root
def test_idle_clients_exhaust_a_worker_without_its_limit(tmp_path, relay):
    # worker_rlimit_nofile 4096 but a hard limit of 64 and no CAP_SYS_RESOURCE:
    # the worker's setrlimit fails and it keeps 64 descriptors, as the lab's
    # nginx kept 1,024 of its 32,768.
    listen = free_port()
    with running_nginx(tmp_path, listen, relay, rlimit=4096, hard=64):
        pidfile = str(tmp_path / "nginx.pid")
        workers, problems = nginx_nofile_problems(pidfile, 4096)
        assert len(problems) == 1
        assert problems[0] == (
            f"nginx worker {workers[0]} may open 64 files but worker_rlimit_nofile asks for "
            "4096: its setrlimit failed (see nginx's error log); the unit needs LimitNOFILE "
            "at least that high"
        )
        assert "setrlimit(RLIMIT_NOFILE, 4096) failed" in (tmp_path / "error.log").read_text()
        cli = subprocess.run(
            [*CLI, "lvs", "nofile", pidfile, "4096"], capture_output=True, text=True
        )
        assert cli.returncode == 1 and "may open 64 files" in cli.stderr
        assert proxied_path("127.0.0.1", listen)[0]
        idle = []
        try:
            for _ in range(40):  # two descriptors each in the worker: more than 64
                idle.append(socket.create_connection(("127.0.0.1", listen), timeout=2))
            time.sleep(0.5)
            # A connect check is still green; the proxied path is not.
            assert tcp_connect("127.0.0.1", listen)
            ok, why = proxied_path("127.0.0.1", listen)
            assert not ok, why
            assert "Too many open files" in (tmp_path / "error.log").read_text()
        finally:
            for conn in idle:
                conn.close()
        # The idle clients gone, the path works again.
        assert wait_for(lambda: proxied_path("127.0.0.1", listen)[0], 10)


def test_ceiling_of_a_manager_without_cap_sys_resource():
    # A stand-in service manager: a process with hard limit 2048 and no
    # CAP_SYS_RESOURCE, as systemd runs in a container.
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048))

    manager = subprocess.Popen(no_sys_resource(["sleep", "30"]), preexec_fn=limit)
    try:
        time.sleep(0.2)
        assert ceiling_problem(2048, manager.pid) is None
        assert ceiling_problem(2049, manager.pid) == (
            f"the service manager (pid {manager.pid}) can grant at most 2048 open files (its "
            "hard limit; it lacks CAP_SYS_RESOURCE, as in a container) but nginx needs 2049: "
            "raise the host's or container's nofile limit, or lower "
            "lvs_director_nginx_worker_connections"
        )
        cli = subprocess.run(
            [*CLI, "lvs", "nofile-ceiling", "4000", "--pid", str(manager.pid)],
            capture_output=True,
            text=True,
        )
        assert cli.returncode == 1 and "can grant at most 2048" in cli.stderr
    finally:
        manager.kill()
        manager.wait()


TEMPLATES = """
- hosts: localhost
  gather_facts: false
  connection: local
  vars:
    carbonscale_venv: /opt/carbonscale/venv
    carbonscale_address: 10.0.0.11
    lvs_director_engine_resolved: {engine: nginx, reason: the kernel has no IPVS}
    lvs_director_keepalived_ipvs: false
  tasks:
%(role_vars)s    - name: The inventory's values (set_fact wins over include_vars)
      ansible.builtin.set_fact:
        lvs_director_real_servers: [10.0.0.21, 10.0.0.22]
        lvs_director_vips: [10.0.0.100]
        lvs_director_vrrp_interface: eth0
        lvs_director_vrrp_priority: 150
        lvs_director_script_user: nobody
    - name: The role's templates
      ansible.builtin.template:
        src: "%(root)s/roles/lvs_director/templates/{{ item }}.j2"
        dest: "{{ out }}/{{ item }}"
        mode: "0755"
      loop: [keepalived.conf, path-ok.sh, pool.json, nginx-limits.conf, nginx.conf]
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("userspace")
    play = out / "render.yml"
    play.write_text(TEMPLATES % {"root": ROOT, "role_vars": role_vars_task("lvs_director")})
    code, output = run_playbook([str(play), "-e", f"out={out}"])
    assert code == 0, output
    return out


def test_userspace_keepalived_tracks_the_proxied_path(rendered):
    text = (rendered / "keepalived.conf").read_text()
    script = text.split("vrrp_script carbonscale_path {")[1].split("\n}\n")[0]
    assert (
        'script "/etc/carbonscale/lvs/path-ok /run/carbonscale-lvs/path.status 14"' in script
    )  # 5 x 2 s + 2 x 1 s + 2 s
    # Light script, timeout far above its interval, one bad round moves nothing.
    assert "interval 2\n" in script and "timeout 10\n" in script
    assert "fall 3\n" in script and script.endswith("rise 2")
    assert "track_script {\n        carbonscale_path\n    }" in text
    assert "nopreempt" in text and "lvs_sync_daemon" not in text  # no IPVS, nothing to sync
    # The pool daemon proves the path of both TCP services into that file.
    pool = Pool.load(str(rendered / "pool.json"))
    assert pool.path_ports == [2003, 2004]
    assert pool.path_status == "/run/carbonscale-lvs/path.status"
    # nginx gets its worker_rlimit_nofile and a margin from the unit.
    assert "worker_rlimit_nofile 32768;" in (rendered / "nginx.conf").read_text()
    assert "\nLimitNOFILE=33792\n" in (rendered / "nginx-limits.conf").read_text()


@needs_keepalived
def test_keepalived_accepts_the_userspace_config(rendered, tmp_path):
    # keepalived checks that the track script exists: the role installs it
    # before it writes keepalived.conf. Here it is the rendered copy.
    text = (rendered / "keepalived.conf").read_text()
    missing = tmp_path / "missing.conf"
    missing.write_text(text)
    code, output = keepalived_config_test(str(missing), KEEPALIVED)
    assert code != 0 and "carbonscale_path since not found" in output
    config = tmp_path / "keepalived.conf"
    config.write_text(text.replace("/etc/carbonscale/lvs/path-ok", str(rendered / "path-ok.sh")))
    assert keepalived_config_test(str(config), KEEPALIVED) == (0, "")


def test_track_script_reads_the_pool_verdict(rendered, tmp_path):
    script = rendered / "path-ok.sh"
    status = tmp_path / "path.status"

    def track(max_age=16):
        return subprocess.run([str(script), str(status), str(max_age)], capture_output=True)

    assert track().returncode == 1  # no verdict yet
    now = int(time.time())
    status.write_text(f"ok {now}\n")
    assert track().returncode == 0
    status.write_text(f"ok {now - 30}\n")
    assert track().returncode == 1  # the pool daemon stopped writing
    status.write_text(f"fail {now} 2003: closed by the proxy within 0.3 s\n")
    assert track().returncode == 1


@needs_relay
@needs_nginx
@needs_root
def test_pool_writes_the_verdict_the_track_script_reads(tmp_path, relay, rendered):
    listen = free_port()
    status = tmp_path / "run" / "path.status"
    pool = Pool.from_dict(
        {
            "services": [],
            "upstreams": str(tmp_path / "upstreams.conf"),
            "state": str(tmp_path / "flap.json"),
            "path": {"status": str(status), "ports": [listen]},
        }
    )
    track = [str(rendered / "path-ok.sh"), str(status), "16"]
    with running_nginx(tmp_path, listen, relay, rlimit=4096, hard=8192):
        assert pool.check_path() == (True, "every port proxies to a relay")
        assert status.read_text().startswith("ok ")
        assert status.stat().st_mode & 0o777 == 0o644
        assert subprocess.run(track).returncode == 0
    # nginx gone: the next round says so, and the track script fails.
    ok, why = pool.check_path()
    assert not ok and why.startswith(f"{listen}: connect failed")
    assert status.read_text().startswith("fail ")
    assert subprocess.run(track).returncode == 1
