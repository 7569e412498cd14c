"""Operator questions about a running cluster, answered on each host over its own
whisper tree, relay config or captured traffic (the `carbonscale ops` verbs), and
merged across hosts (the fabfile's tasks call the verbs over SSH and merge their
JSON with the functions here).

* `tree`: this host's whisper files, their metric names and which the ring gives
  to this host (`owned_mask`).
* `lookup`: where metrics live: owners, files, newest points, stray copies.
* `du`: whisper bytes and files, free space, growth and the date a host fills up.
* `inconsistent`: files on a host that does not own them.
* `hotmetrics`: the hot metrics of a capture, and the load they put on each
  storage instance (carbonscale.ring) and statsd daemon (the statsd relay's placement).
* `relays`: the relays' own counters, as they land in whisper.
* `migration`: the migration journal's counts (carbonscale.migrate.journal).
"""
