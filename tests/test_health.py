"""Health probes against real listening sockets."""

import socket
import threading

from carbonscale.health import statsd_admin_health, tcp_connect


def _serve_once(reply: bytes | None):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run():
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            if reply is not None:
                conn.sendall(reply)
            else:
                threading.Event().wait(2)  # wedged: never answers
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1]


def test_statsd_admin_up():
    assert statsd_admin_health("127.0.0.1", _serve_once(b"health: up\n"))


def test_statsd_admin_down():
    assert not statsd_admin_health("127.0.0.1", _serve_once(b"health: down\n"))


def test_statsd_admin_wedged_is_down():
    assert not statsd_admin_health("127.0.0.1", _serve_once(None), timeout=0.3)


def _closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_nothing_listening_is_down():
    port = _closed_port()
    assert not statsd_admin_health("127.0.0.1", port)
    assert not tcp_connect("127.0.0.1", port)


def test_tcp_connect_up():
    assert tcp_connect("127.0.0.1", _serve_once(b""))


def test_statsd_admin_other_reply_is_down():
    # A reply that merely contains "up" somewhere is not statsd saying up.
    assert not statsd_admin_health("127.0.0.1", _serve_once(b"unsupported command\n"))
