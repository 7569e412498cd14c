"""A DR real server's listeners, run inside a network namespace of the VM.

    python3 vm_realserver_sink.py NAME LOGFILE

Accepts Graphite line (TCP 2003) and pickle (TCP 2004) connections and statsd
datagrams (UDP 8125) on every address (the VIP on lo included) and appends
`PORT SOURCE PAYLOAD` lines to LOGFILE (pickle frames as their length).
TCP 8126 is a statsd admin port: `health` gets `health: up`, or `health:
down` while the file LOGFILE.down exists. Standard library only: it runs on
the guest's python3.
"""

from __future__ import annotations

import os
import socketserver
import struct
import sys
import threading

NAME, LOG = sys.argv[1], sys.argv[2]
lock = threading.Lock()


def record(port: int, source: str, payload: str) -> None:
    with lock, open(LOG, "a") as log:
        log.write(f"{port} {source} {payload}\n")


class Line(socketserver.StreamRequestHandler):
    def handle(self):
        for raw in self.rfile:
            record(2003, self.client_address[0], raw.decode(errors="replace").strip())


class Pickle(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            header = self.rfile.read(4)
            if len(header) < 4:
                return
            (length,) = struct.unpack("!L", header)
            self.rfile.read(length)
            record(2004, self.client_address[0], f"frame {length}")


class Admin(socketserver.StreamRequestHandler):
    def handle(self):
        for raw in self.rfile:
            if raw.strip() == b"health":
                down = os.path.exists(LOG + ".down")
                self.wfile.write(b"health: down\n" if down else b"health: up\n")


class Statsd(socketserver.BaseRequestHandler):
    def handle(self):
        data, _ = self.request
        record(8125, self.client_address[0], data.decode(errors="replace").strip())


class TCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


servers = [
    TCP(("0.0.0.0", 2003), Line),
    TCP(("0.0.0.0", 2004), Pickle),
    TCP(("0.0.0.0", 8126), Admin),
    socketserver.ThreadingUDPServer(("0.0.0.0", 8125), Statsd),
]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print(f"{NAME}: listening", flush=True)
threading.Event().wait()
