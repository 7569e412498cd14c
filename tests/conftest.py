"""Shared pytest hooks for the unit tests."""

# The session's one VM for the tests marked `vm` (booted only when one of
# them runs).
from vm_lab import VM_TEST_ORDER, booted_vm, director_vm, storage_vm  # noqa: F401


def pytest_collection_modifyitems(items):
    # The tests marked `slow` take 30 s to 3 minutes each. pytest-xdist hands
    # tests out in collection order, so one of them collected last would run
    # alone at the end while the other worker idles: they start first.
    # The VM's tests: the kernel's first (cheap, before the playbook run),
    # the one that powers the guest off last.
    items.sort(
        key=lambda item: (
            item.get_closest_marker("slow") is None,
            VM_TEST_ORDER.get(item.module.__name__, 0),
        )
    )
