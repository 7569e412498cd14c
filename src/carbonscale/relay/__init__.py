"""The relays in front of carbon-c-relay and statsd.

`carbonscale.relay.pickle_relay` turns carbon's pickle protocol (port 2004)
into the line protocol carbon-c-relay speaks; each relay is one module here
and one verb under `carbonscale relay` (src/carbonscale/commands/relay.py).
"""
