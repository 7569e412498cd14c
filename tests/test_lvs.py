"""The LVS tier's decisions (carbonscale.lvs) and the lvs_director role's checks.

The role's keepalived template is rendered by ansible-playbook on localhost
and tested by the real keepalived (--config-test); bad services go through
the role's own argument specs and validation tasks. The role itself runs on
containers in the cluster scenario (molecule/cluster/tests/test_lvs.py).
"""

import shutil
import subprocess

import pytest
import yaml
from ansible_runner import ROOT, role_vars_task, run_playbook

from carbonscale import CarbonscaleError
from carbonscale.lvs import (
    interface_networks,
    ipvs_available,
    keepalived_config_test,
    resolve_engine,
    service_errors,
)

DEFAULTS = yaml.safe_load((ROOT / "roles/lvs_director/defaults/main.yml").read_text())
SERVICES = DEFAULTS["lvs_director_services"]
KEEPALIVED = shutil.which("keepalived") or "/usr/sbin/keepalived"
needs_keepalived = pytest.mark.skipif(
    not shutil.which(KEEPALIVED), reason="keepalived is not installed (make host-deps)"
)


def test_default_services_are_fine():
    assert service_errors(SERVICES, ["10.0.0.100"], ["10.0.0.0/24"]) == []
    assert [(s["protocol"], s["port"]) for s in SERVICES] == [
        ("TCP", 2003),
        ("TCP", 2004),
        ("UDP", 8125),
    ]
    statsd = SERVICES[2]
    assert statsd["ops"] is True and not statsd.get("persistence_timeout")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"port": 2003}, "TCP port 2003 is already used by lvs_director_services[0] (line)"),
        ({"scheduler": "fastest"}, "unknown scheduler 'fastest'"),
        ({"persistence_timeout": 300, "protocol": "TCP"}, None),
        ({"method": "XX"}, "method must be one of DR, NAT, TUN"),
        ({"ops": True}, "ops (one-packet scheduling) is for UDP services only"),
        ({"protocol": "SCTP"}, "protocol must be TCP or UDP"),
    ],
)
def test_bad_tcp_service(change, message):
    services = [dict(s) for s in SERVICES]
    services[1].update(change)
    errors = service_errors(services, ["10.0.0.100"], ["10.0.0.0/24"])
    if message is None:
        assert errors == []
    else:
        assert len(errors) == 1 and message in errors[0], errors


def test_udp_with_persistence_and_a_tcp_check_are_refused():
    services = [dict(s) for s in SERVICES]
    services[2].update(persistence_timeout=60, check="tcp")
    errors = service_errors(services, ["10.0.0.100"], ["10.0.0.0/24"])
    assert len(errors) == 2
    assert "UDP with persistence_timeout 60" in errors[0]
    assert "a UDP service needs check statsd" in errors[1]


def test_same_port_on_tcp_and_udp_is_no_clash():
    services = [*SERVICES, {"name": "statsd-tcp", "protocol": "TCP", "port": 8125}]
    assert service_errors(services, ["10.0.0.100"], ["10.0.0.0/24"]) == []


def test_vip_outside_every_network_and_bad_vips():
    errors = service_errors(SERVICES, ["192.0.2.10", "not-an-ip"], ["10.0.0.0/24", "10.9.0.0/16"])
    assert errors == [
        "lvs_vips: 192.0.2.10 is outside every network of this director "
        "(10.0.0.0/24, 10.9.0.0/16): no interface could answer for it",
        "lvs_vips: 'not-an-ip' is not an IP address",
    ]
    assert service_errors(SERVICES, [], None) == [
        "lvs_vips must list at least one virtual IP address"
    ]
    # Without facts the network check is skipped.
    assert service_errors(SERVICES, ["192.0.2.10"], None) == []


def test_interface_networks_from_facts():
    facts = {
        "interfaces": ["lo", "eth0", "br-lab"],
        "lo": {"ipv4": {"address": "127.0.0.1", "netmask": "255.0.0.0", "network": "127.0.0.0"}},
        "eth0": {
            "ipv4": {"address": "10.0.0.11", "netmask": "255.255.255.0", "network": "10.0.0.0"},
            # The VIP held by the master is a /32: no network of its own.
            "ipv4_secondaries": [
                {"address": "10.0.0.100", "netmask": "255.255.255.255", "network": "10.0.0.100"}
            ],
        },
        "br_lab": {
            "ipv4": {"address": "172.30.0.1", "netmask": "255.255.255.0", "network": "172.30.0.0"}
        },
    }
    assert interface_networks(facts) == ["127.0.0.0/8", "10.0.0.0/24", "172.30.0.0/24"]


def test_engine_resolution():
    assert resolve_engine("auto", True, "x").name == "ipvs"
    fallback = resolve_engine("auto", False, "the kernel has no IPVS (why)")
    assert fallback.name == "nginx"
    assert fallback.warning.startswith("the kernel has no IPVS (why): the virtual servers run in")
    assert resolve_engine("nginx", True, "x").name == "nginx"
    with pytest.raises(CarbonscaleError, match="lvs_engine is ipvs but the kernel has no IPVS"):
        resolve_engine("ipvs", False, "the kernel has no IPVS")
    with pytest.raises(CarbonscaleError, match="lvs_engine must be one of"):
        resolve_engine("lvs", True, "x")


def test_ipvs_detection(tmp_path):
    proc = tmp_path / "ip_vs"
    proc.write_text("IP Virtual Server version 1.2.1\n")
    assert ipvs_available(str(proc)) == (True, f"{proc} exists")
    has, reason = ipvs_available(str(tmp_path / "missing"))
    assert has is False and reason.startswith(f"the kernel has no IPVS ({tmp_path}/missing is")


RENDER = """
- hosts: localhost
  gather_facts: false
  connection: local
  vars:
    carbonscale_venv: /opt/carbonscale/venv
    carbonscale_address: 10.0.0.11
    lvs_director_engine_resolved: {engine: ipvs, reason: test}
    lvs_director_keepalived_ipvs: true
  tasks:
%(role_vars)s    - name: The inventory's values (set_fact wins over include_vars)
      ansible.builtin.set_fact:
        lvs_director_real_servers: [10.0.0.21, 10.0.0.22]
        lvs_director_vips: [10.0.0.100, 10.0.0.101]
        lvs_director_vrrp_interface: eth0
        lvs_director_vrrp_priority: 150
        lvs_director_vrrp_auth_pass: secret12
        lvs_director_vrrp_unicast_peers: [10.0.0.12]
        # A user this machine has (keepalived checks that it exists).
        lvs_director_script_user: nobody
    - name: The role's template
      ansible.builtin.template:
        src: %(root)s/roles/lvs_director/templates/keepalived.conf.j2
        dest: "{{ out }}"
        mode: "0644"
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lvs")
    play = tmp / "render.yml"
    play.write_text(RENDER % {"root": ROOT, "role_vars": role_vars_task("lvs_director")})
    out = tmp / "keepalived.conf"
    code, output = run_playbook([str(play), "-e", f"out={out}"])
    assert code == 0, output
    return out


def test_rendered_ipvs_config_has_every_virtual_server(rendered):
    text = rendered.read_text()
    assert text.count("virtual_server ") == 6  # 2 VIPs x 3 services
    assert "virtual_server 10.0.0.101 8125 {" in text
    statsd = text.split("virtual_server 10.0.0.100 8125 {")[1].split("virtual_server")[0]
    assert "protocol UDP" in statsd and "\n    ops\n" in statsd
    assert "persistence_timeout" not in statsd
    assert statsd.count("MISC_CHECK") == 2
    assert (
        'misc_path "/opt/carbonscale/venv/bin/carbonscale health statsd 10.0.0.22 8126 --quiet '
        "--state /var/lib/carbonscale/lvs/flap.json" in statsd
    )
    line = text.split("virtual_server 10.0.0.100 2003 {")[1].split("virtual_server")[0]
    assert "lvs_method DR" in line and "lvs_sched wlc" in line and line.count("TCP_CHECK") == 2
    assert "enable_script_security" in text and "script_user nobody" in text
    vrrp = text.split("vrrp_instance carbonscale {")[1].split("\n}\n")[0]
    assert "auth_pass secret12" in vrrp
    assert "unicast_src_ip 10.0.0.11" in vrrp and "unicast_peer {\n        10.0.0.12\n" in vrrp
    assert "10.0.0.100/32 dev eth0" in vrrp and "10.0.0.101/32 dev eth0" in vrrp
    # A returning director does not take the VIPs back (issue 19, item 4).
    assert "\n    state BACKUP\n    nopreempt\n" in vrrp
    # IPVS: the master's connection table is synced to the backups.
    global_defs = text.split("global_defs {")[1].split("\n}\n")[0]
    assert "\n    lvs_sync_daemon eth0 carbonscale id 51" in global_defs


def _keepalived_version() -> tuple[int, ...]:
    out = subprocess.run([KEEPALIVED, "--version"], capture_output=True, text=True).stderr
    return tuple(int(x) for x in out.split()[1].lstrip("v").split(".")[:3])


@needs_keepalived
def test_keepalived_accepts_the_rendered_config(rendered):
    assert keepalived_config_test(str(rendered), KEEPALIVED) == (0, "")
    if _keepalived_version() < (2, 2, 8):
        # Why the workaround exists: keepalived 2.2.7's own config test kills
        # itself whenever a script runs as a non-root user.
        raw = subprocess.run(
            [KEEPALIVED, "--config-test", "-f", str(rendered)],
            capture_output=True,
            start_new_session=True,
        )
        assert raw.returncode == -15


@needs_keepalived
def test_a_missing_script_user_is_refused(rendered, tmp_path):
    config = tmp_path / "keepalived.conf"
    config.write_text(rendered.read_text().replace("script_user nobody", "script_user nosuchuser"))
    assert keepalived_config_test(str(config), KEEPALIVED) == (
        1,
        f"{config}: script_user nosuchuser does not exist\n",
    )


@needs_keepalived
@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("lvs_sched wlc", "lvs_sched fastest", "Invalid lvs_scheduler 'fastest'"),
        ("lvs_method DR", "lvs_method XX", "unknown [XX] routing method"),
        ("    ops\n", "    ops\n    }\n", "Unknown keyword 'real_server'"),
        # nopreempt only holds for directors that start as BACKUP.
        ("    state BACKUP\n", "    state MASTER\n", "nopreempt will not work with initial state"),
        ("carbonscale id 51", "carbonscale id 999", "Invalid syncid (999)"),
    ],
)
def test_keepalived_refuses_a_broken_config(rendered, tmp_path, old, new, message):
    broken = tmp_path / "keepalived.conf"
    broken.write_text(rendered.read_text().replace(old, new, 1))
    code, output = keepalived_config_test(str(broken), KEEPALIVED)
    assert code != 0
    assert message in output
    # Messages name the file tested, never the copy the workaround made.
    assert ".config-test-" not in output
    assert list(tmp_path.iterdir()) == [broken]


VALIDATE = """
- hosts: localhost
  gather_facts: true
  gather_subset: [network]
  connection: local
  tasks:
%(role_vars)s    - name: Extra variables win over include_vars
      ansible.builtin.set_fact:
        lvs_director_services: "{{ services | default(lvs_director_services) }}"
        lvs_director_vips: "{{ vips }}"
        lvs_director_real_servers: [10.0.0.21]
        lvs_director_vrrp_priority: 150
    - name: The role's argument specs
      ansible.builtin.validate_argument_spec:
        argument_spec: "{{ (lookup('file', '%(root)s/roles/lvs_director/meta/argument_specs.yml')
                           | from_yaml).argument_specs.main.options }}"
    - name: The role's checks
      ansible.builtin.include_tasks: %(root)s/roles/lvs_director/tasks/validate.yml
"""


def _validate(tmp_path, services, vips):
    play = tmp_path / "validate.yml"
    play.write_text(VALIDATE % {"root": ROOT, "role_vars": role_vars_task("lvs_director")})
    extra = {"vips": vips} | ({"services": services} if services is not None else {})
    return run_playbook([str(play), "-e", yaml.safe_dump(extra, default_flow_style=True)])


def _local_address() -> str:
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    return out.stdout.split()[3].split("/")[0] if out.stdout.split() else "127.0.0.2"


def test_role_accepts_the_defaults(tmp_path):
    code, output = _validate(tmp_path, None, [_local_address()])
    assert code == 0, output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"port": 2003},
            "lvs_director_services[1] (pickle): TCP port 2003 is already used by "
            "lvs_director_services[0] (line)",
        ),
        ({"scheduler": "fastest"}, "value of scheduler must be one of: rr, wrr, lc, wlc"),
        (
            {"protocol": "UDP", "persistence_timeout": 300, "check": "statsd"},
            "UDP with persistence_timeout 300",
        ),
    ],
)
def test_role_refuses_bad_services(tmp_path, change, message):
    services = [dict(s) for s in SERVICES]
    services[1].update(change)
    code, output = _validate(tmp_path, services, [_local_address()])
    assert code != 0
    assert message in output, output


def test_role_refuses_a_vip_outside_every_network(tmp_path):
    code, output = _validate(tmp_path, None, ["198.51.100.77"])
    assert code != 0
    assert "lvs_vips: 198.51.100.77 is outside every network of this director" in output, output


def test_the_userspace_pool_knows_every_scheduler_and_check():
    # One IPVS scheduler list (argument specs, service_errors) and the nginx
    # translation of each; one list of checks and the probes behind them.
    from carbonscale.health import PROBES
    from carbonscale.lvs import CHECKS, SCHEDULERS
    from carbonscale.lvs_pool import NGINX_BALANCE

    spec = yaml.safe_load((ROOT / "roles/lvs_director/meta/argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]["lvs_director_services"]["options"]
    assert set(SCHEDULERS) == set(NGINX_BALANCE) == set(options["scheduler"]["choices"])
    assert set(CHECKS) == set(PROBES) == set(options["check"]["choices"])
