"""The migrate scenario's verify: the migration checks (test_migrate.py) run
before the storage tier's (test_storage.py), whatever order molecule passes
the modules in. The migration plans over whole whisper trees and checks that
every file ends on its owners; the storage checks' files must not be there
yet."""


def pytest_collection_modifyitems(items):
    # sort() is stable: tests keep their order within a module.
    items.sort(key=lambda item: item.path.name)
