#!/usr/bin/python3
"""Check a rendered carbon config with carbon's and whisper's own parsers.

    check-carbon-config carbon-conf FILE INSTANCE...
    check-carbon-config schemas FILE
    check-carbon-config aggregation FILE

carbon-cache skips a bad schema section with a log line and writes the
metric with the next rule (or its 1-day default), which is found weeks later
when the data is gone. Here every problem is fatal, before the file goes live.
Runs on the node with the python graphite-carbon is installed for.
"""

import re
import sys


def fail(message):
    print(f"check-carbon-config: {message}", file=sys.stderr)
    sys.exit(1)


def check_carbon_conf(path, instances):
    from carbon.conf import CarbonConfigException, Settings

    if not instances:
        fail("carbon-conf needs the instance names to check")
    ports = {}
    for name in instances:
        settings = Settings()
        try:
            settings.readFrom(path, "cache")
            settings.readFrom(path, f"cache:{name}")
        except (CarbonConfigException, ValueError) as exc:
            fail(f"{path}: {exc}")
        for key in ("LINE_RECEIVER_PORT", "PICKLE_RECEIVER_PORT", "CACHE_QUERY_PORT"):
            port = settings[key]
            if not isinstance(port, int) or not 0 < port < 65536:
                fail(f"{path}: [cache:{name}] {key} = {port!r} is not a port")
            if port in ports:
                fail(f"{path}: [cache:{name}] {key} {port} clashes with {ports[port]}")
            ports[port] = f"[cache:{name}] {key}"
        if settings["LOCAL_DATA_DIR"] in ("", None):
            fail(f"{path}: LOCAL_DATA_DIR is empty")


def check_schemas(path):
    import os

    import whisper
    from carbon.conf import OrderedConfigParser, settings

    # carbon.storage reads CONF_DIR at import; carbon-cache sets it from
    # --config, so give it the directory of the file under test.
    settings.setdefault("CONF_DIR", os.path.dirname(os.path.abspath(path)))
    from carbon.storage import Archive

    config = OrderedConfigParser()
    config.read(path)
    if not config.sections():
        fail(f"{path}: no schema sections")
    for section in config.sections():
        options = dict(config.items(section))
        if "pattern" not in options or "retentions" not in options:
            fail(f"{path}: [{section}] needs both pattern and retentions")
        try:
            re.compile(options["pattern"])
        except re.error as exc:
            fail(f"{path}: [{section}] pattern {options['pattern']!r}: {exc}")
        try:
            archives = [Archive.fromString(s) for s in options["retentions"].split(",")]
            whisper.validateArchiveList([a.getTuple() for a in archives])
        except (ValueError, whisper.InvalidConfiguration) as exc:
            fail(f"{path}: [{section}] retentions {options['retentions']!r}: {exc}")


def check_aggregation(path):
    import whisper
    from carbon.conf import OrderedConfigParser

    config = OrderedConfigParser()
    config.read(path)
    for section in config.sections():
        options = dict(config.items(section))
        if "pattern" not in options:
            fail(f"{path}: [{section}] needs a pattern")
        try:
            re.compile(options["pattern"])
        except re.error as exc:
            fail(f"{path}: [{section}] pattern {options['pattern']!r}: {exc}")
        xff = options.get("xfilesfactor")
        if xff is not None:
            try:
                value = float(xff)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:
                fail(f"{path}: [{section}] xFilesFactor {xff!r} must be between 0 and 1")
        method = options.get("aggregationmethod")
        if method is not None and method not in whisper.aggregationMethods:
            fail(
                f"{path}: [{section}] aggregationMethod {method!r} is not one of "
                f"{', '.join(whisper.aggregationMethods)}"
            )


def main(argv):
    if len(argv) < 3:
        fail("usage: check-carbon-config carbon-conf|schemas|aggregation FILE [INSTANCE...]")
    kind, path = argv[1], argv[2]
    try:
        with open(path, encoding="utf-8") as handle:
            handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}")
    if kind == "carbon-conf":
        check_carbon_conf(path, argv[3:])
    elif kind == "schemas":
        check_schemas(path)
    elif kind == "aggregation":
        check_aggregation(path)
    else:
        fail(f"unknown kind {kind!r}: carbon-conf, schemas or aggregation")
    print(f"{path}: ok")


if __name__ == "__main__":
    main(sys.argv)
