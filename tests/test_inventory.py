"""carbonscale.inventory: one address rule for ring members, statsd backends, LVS real servers."""

import pytest

from carbonscale import CarbonscaleError
from carbonscale.inventory import backends_from_inventory, bracket, host_address

HOSTVARS = {
    "set": {"carbonscale_address": "10.0.0.21", "ansible_default_ipv4": {"address": "10.9.9.9"}},
    "gathered": {"ansible_default_ipv4": {"address": "10.0.0.22"}},
    "v6": {"carbonscale_address": "fd00::23"},
    "bare": {},
}


def test_carbonscale_address_first_then_the_gathered_default():
    assert host_address("set", HOSTVARS) == "10.0.0.21"
    assert host_address("gathered", HOSTVARS) == "10.0.0.22"


def test_missing_host_and_missing_address_name_the_host():
    with pytest.raises(CarbonscaleError, match=r"^relay host nope is not in the inventory$"):
        host_address("nope", HOSTVARS, "relay host")
    with pytest.raises(CarbonscaleError, match=r"^relay host bare has no carbonscale_address"):
        host_address("bare", HOSTVARS, "relay host")


def test_brackets_only_for_bare_ipv6():
    assert bracket("fd00::23") == "[fd00::23]"
    assert bracket("[fd00::23]") == "[fd00::23]"
    assert bracket("10.0.0.1") == "10.0.0.1"


def test_statsd_backends_use_the_same_rule():
    instances = [{"name": "a", "port": 8127, "admin_port": 8128}]
    assert backends_from_inventory(["gathered", "v6"], HOSTVARS, instances) == [
        "10.0.0.22:8127:8128",
        "[fd00::23]:8127:8128",
    ]
