"""Shared pytest hooks for the unit tests."""


def pytest_collection_modifyitems(items):
    # The tests marked `slow` take 30 s to 3 minutes each. pytest-xdist hands
    # tests out in collection order, so one of them collected last would run
    # alone at the end while the other worker idles: they start first.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
