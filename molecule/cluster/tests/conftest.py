"""The cluster scenario's verify: every test module here runs against the one
converged cluster, in module name order, with the checks that break something
(marked `disruptive`: they stop, flap or restart hosts and services) after
all the others. A disruptive check puts back what it broke before it ends,
so the order among them does not matter and a check added later sees the
cluster whole. A check that changes the ring itself (marked `reshapes`:
tests/test_lifecycle.py moves the storage tier to other hosts) runs after
every other one, since it leaves the cluster on another ring.
"""

from __future__ import annotations

import pytest
from cluster_hosts import Cluster
from query_data import QueryTier
from query_data import prepare as prepare_query_tier


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "disruptive: stops or restarts cluster services; runs after the other checks"
    )
    config.addinivalue_line(
        "markers", "reshapes: moves the storage tier to another ring; runs after every other check"
    )


def pytest_collection_modifyitems(items):
    # molecule passes the modules in the order it walked the directory: sort
    # them by name. sort() is stable, so tests keep their order in a module.
    items.sort(
        key=lambda item: (
            item.get_closest_marker("reshapes") is not None,
            item.get_closest_marker("disruptive") is not None,
            item.path.name,
        )
    )


@pytest.fixture(scope="session")
def cluster(request) -> Cluster:
    inventory = request.config.option.ansible_inventory
    assert inventory, "run with --ansible-inventory (molecule verify and scripts/lab.py do)"
    return Cluster(inventory)


@pytest.fixture(scope="session")
def query_tier(cluster) -> QueryTier:
    """The query checks' series, written once on the storage hosts (query_data.py)."""
    return prepare_query_tier(cluster)
