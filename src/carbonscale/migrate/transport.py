"""The node-to-node file service of a migration: `carbonscale migrate serve`.

Every storage host runs one. A destination host pulls the files it needs
straight from each source host (never through the controller), many files in
one streamed response: per-request overhead, not bandwidth, is what makes a
file-by-file copy slow.

Read-only, and only three requests:

* ``GET /list``: the whisper tree as a listing (`encode_listing`): relative
  paths, sizes, mtimes, and the free bytes of the filesystem.
* ``POST /files`` with newline-separated relative paths: one stream of
  ``F <size> <path>\\n<bytes>`` or ``E <path>\\t<reason>\\n`` records, then
  ``END\\n``; the connection closes after it. Each file is sent (sendfile,
  from the page cache) under flock(LOCK_SH), the lock carbon's
  WHISPER_LOCK_WRITES writer takes exclusively, so it is a consistent
  snapshot, never a file caught mid-write.
  A file that cleanup moved to `.quarantine/<plan>/` is served from there.
* ``GET /status``: the journal's counts on this host (JSON).

Refused before anything is read: a client address outside the allowlist.
Refused before the body is read: a request without a valid signature
(HMAC-SHA256 of method, path, timestamp and body digest under the cluster's
shared secret, compared in constant time, timestamp within `MAX_SKEW`).
Never served: a path that is absolute, has a `..` or empty component, a
dot-directory (staging, quarantine), is not a `.wsp`, or resolves (through a
symlink) outside the whisper root.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from carbonscale import CarbonscaleError

DEFAULT_PORT = 2099
MAX_SKEW = 300  # seconds a signed request stays valid
MAX_BODY = 64 << 20  # a batch request of paths is far smaller
LISTING_MAGIC = b"CSLIST1"
HEADER_TIME = "X-Carbonscale-Time"
QUARANTINE = ".quarantine"  # where cleanup moves copies (engine.QUARANTINE)
HEADER_SIGNATURE = "X-Carbonscale-Signature"


# ----- secrets and signatures ------------------------------------------------


def read_secret(path: str) -> bytes:
    """The shared secret from a file (surrounding whitespace stripped)."""
    try:
        with open(path, "rb") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise CarbonscaleError(f"cannot read secret file {path}: {exc.strerror}") from exc
    if len(secret) < 16:
        raise CarbonscaleError(f"secret file {path}: the secret must be at least 16 bytes")
    return secret


def sign(secret: bytes, method: str, path: str, timestamp: str, body: bytes) -> str:
    digest = hashlib.sha256(body).hexdigest()
    message = f"{method}\n{path}\n{timestamp}\n{digest}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def parse_allowlist(entries: Iterable[str]) -> list:
    networks = []
    for entry in entries:
        for part in entry.split(","):
            if not part.strip():
                continue
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError as exc:
                raise CarbonscaleError(f"allowlist entry {part!r}: {exc}") from exc
    if not networks:
        raise CarbonscaleError("the allowlist is empty: give --allow with the cluster's addresses")
    return networks


def address_allowed(address: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


# ----- the whisper tree ---------------------------------------------------------


def safe_relative(path: str) -> str | None:
    """`path` if it is a plain relative `.wsp` path inside the tree, else None."""
    if not path or path.startswith("/") or "\0" in path or "\\" in path or "\n" in path:
        return None
    parts = path.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    return path if path.endswith(".wsp") else None


def walk_tree(root: str) -> Iterator[tuple[str, int, int]]:
    """(relative path, size, mtime) of every regular *.wsp under root; dot-directories
    (staging, quarantine) and symlinks are skipped."""
    stack = [""]
    while stack:
        relative = stack.pop()
        directory = os.path.join(root, relative) if relative else root
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = f"{relative}/{entry.name}" if relative else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(path)
                elif entry.name.endswith(".wsp") and entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    yield path, info.st_size, int(info.st_mtime)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def encode_listing(entries: Iterable[tuple[str, int, int]], free_bytes: int) -> bytes:
    """`CSLIST1 <count> <paths bytes> <free>\\n`, the paths (one a line), then the sizes
    and mtimes as little-endian int64 arrays: parsed with a split and two frombuffer
    calls, however many millions of files."""
    paths, sizes, mtimes = [], [], []
    for path, size, mtime in entries:
        paths.append(path.encode("utf-8", "surrogateescape"))
        sizes.append(size)
        mtimes.append(mtime)
    block = b"".join(p + b"\n" for p in paths)
    head = b"%s %d %d %d\n" % (LISTING_MAGIC, len(paths), len(block), free_bytes)
    return (
        head
        + block
        + np.asarray(sizes, dtype="<i8").tobytes()
        + np.asarray(mtimes, dtype="<i8").tobytes()
    )


class Listing:
    """One host's whisper tree: `block` (the paths, one a line, each ending in a
    newline), `sizes`, `mtimes` (int64 arrays), `free` bytes on its filesystem.
    The paths stay one bytes object: ten million path objects would cost gigabytes."""

    def __init__(
        self, block: bytes, count: int, sizes: np.ndarray, mtimes: np.ndarray, free: int
    ) -> None:
        self.block, self.count = block, count
        self.sizes, self.mtimes, self.free = sizes, mtimes, free

    @property
    def paths(self) -> list[bytes]:
        return self.block.split(b"\n")[:-1]

    def __len__(self) -> int:
        return self.count


def decode_listing(data: bytes, source: str = "listing") -> Listing:
    # Offsets into data, not a partition: the paths are copied out once (a listing
    # of ten million files is a gigabyte).
    start = data.find(b"\n") + 1
    fields = data[: start - 1].split() if start else []
    if len(fields) != 4 or fields[0] != LISTING_MAGIC:
        raise CarbonscaleError(f"{source} is not a carbonscale listing")
    try:
        count, length, free = (int(x) for x in fields[1:])
    except ValueError as exc:
        raise CarbonscaleError(f"{source}: bad listing header") from exc
    if len(data) - start != length + 16 * count:
        raise CarbonscaleError(f"{source}: truncated listing")
    block = data[start : start + length]
    if block.count(b"\n") != count or (block and not block.endswith(b"\n")):
        raise CarbonscaleError(f"{source}: the paths do not match the header's count {count}")
    sizes = np.frombuffer(data, "<i8", count, start + length).astype(np.int64)
    mtimes = np.frombuffer(data, "<i8", count, start + length + 8 * count).astype(np.int64)
    return Listing(block, count, sizes, mtimes, free)


def free_bytes(root: str) -> int:
    info = os.statvfs(root)
    return info.f_bavail * info.f_frsize


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeOpener:
    """Opens files below one root, refusing every symlink below it: each directory
    is opened with O_NOFOLLOW relative to its parent's descriptor (openat), so what
    is checked is what is opened (no check-then-open race, no path walked twice).
    The last directory stays open for the next file: a batch's files share their
    directories. Use as a context manager; `open` raises OSError (EACCES for a
    path refused or leaving the root through a symlink)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.directory: tuple[str, int] | None = None

    def __enter__(self) -> TreeOpener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.directory is not None:
            os.close(self.directory[1])
            self.directory = None

    def _open_directory(self, relative_dir: str) -> int:
        if self.directory is not None and self.directory[0] == relative_dir:
            return self.directory[1]
        self.close()
        fd = os.open(self.root, _DIRECTORY)  # the root itself may be a symlink
        try:
            for part in relative_dir.split("/") if relative_dir else ():
                try:
                    inner = os.open(part, _DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    # O_NOFOLLOW | O_DIRECTORY on a symlink: ENOTDIR (ELOOP elsewhere)
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                        os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                    ):
                        raise OSError(
                            errno.EACCES, "path leaves the whisper root through a symlink"
                        ) from None
                    raise
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        self.directory = (relative_dir, fd)
        return fd

    def open(self, relative: str) -> int:
        """An fd of root/relative (a regular file, no symlink on the way)."""
        if safe_relative(relative) is None:
            raise OSError(errno.EACCES, "path refused")
        relative_dir, _, name = relative.rpartition("/")
        fd = os.open(name, _FILE, dir_fd=self._open_directory(relative_dir))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EACCES, "not a regular file")
        return fd


def open_in_root(root: str, relative: str) -> int:
    """An fd of root/relative, refusing anything outside the root (OSError EACCES)."""
    with TreeOpener(root) as opener:
        return opener.open(relative)


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 16 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# ----- the server ---------------------------------------------------------------


class FileServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        root: str,
        secret: bytes,
        allow: list,
        status: Callable[[], dict] | None = None,
    ) -> None:
        self.root = os.path.realpath(root)
        self.secret = secret
        self.allow = allow
        self.status = status
        self.refused = 0
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, FileHandler)

    def handle_error(self, request, client_address) -> None:
        """A peer that went away mid-response (killed, timed out) is not news."""
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def verify_request(self, request, client_address) -> bool:
        """Called before a byte of the request is read: outsiders are dropped here."""
        if address_allowed(client_address[0], self.allow):
            return True
        self.refused += 1
        return False


class FileHandler(http.server.BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"
    server_version = "carbonscale-migrate"

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: a migration makes thousands of requests

    def _refuse(self, code: int, why: str) -> None:
        body = (why + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _authenticated(self, body: bytes) -> bool:
        stamp = self.headers.get(HEADER_TIME, "")
        given = self.headers.get(HEADER_SIGNATURE, "")
        try:
            skew = abs(time.time() - int(stamp))
        except ValueError:
            skew = MAX_SKEW + 1
        expected = sign(self.server.secret, self.command, self.path, stamp, body)
        if not hmac.compare_digest(expected.encode(), given.encode()) or skew > MAX_SKEW:
            self._refuse(403, "bad or expired signature")
            return False
        return True

    def do_GET(self) -> None:
        if not self._authenticated(b""):
            return
        if self.path == "/list":
            entries = walk_tree(self.server.root)
            self._send(encode_listing(entries, free_bytes(self.server.root)))
        elif self.path == "/status" and self.server.status is not None:
            self._send(json.dumps(self.server.status()).encode())
        else:
            self._refuse(404, "no such resource")

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if self.path != "/files":
            self._refuse(404, "no such resource")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._refuse(400, "bad Content-Length")
            return
        # The signature covers the body, so it is read (bounded) before the check.
        body = self.rfile.read(length)
        if not self._authenticated(body):
            return
        paths = body.decode("utf-8", "surrogateescape").split("\n")
        # The body ends where the connection does: no chunk framing to parse, and
        # each file goes from the page cache to the socket with sendfile.
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        out = self.connection
        with TreeOpener(self.server.root) as opener:
            for relative in paths:
                if relative:
                    self._stream_file(out, opener, relative)
        out.sendall(b"END\n")

    def _quarantined(self, relative: str) -> int:
        """A copy a cleanup moved to quarantine is still the same data: a verify (or a
        late sync) of another host still gets it. FileNotFoundError if there is none."""
        base = os.path.join(self.server.root, QUARANTINE)
        try:
            plans = sorted(os.listdir(base))
        except OSError:
            plans = []
        for plan in plans:
            try:
                return open_in_root(os.path.join(base, plan), relative)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(errno.ENOENT, "no such file")

    def _stream_file(self, out: socket.socket, opener: TreeOpener, relative: str) -> None:
        name = relative.encode("utf-8", "surrogateescape")
        try:
            try:
                fd = opener.open(relative)
            except FileNotFoundError:
                fd = self._quarantined(relative)
        except OSError as exc:
            reason = "no such file" if exc.errno == errno.ENOENT else exc.strerror
            out.sendall(b"E %s\t%s\n" % (name, str(reason).encode()))
            return
        try:
            # LOCK_SH for the whole send: carbon's locked writes wait, so the
            # bytes sent are one consistent snapshot of the file.
            fcntl.flock(fd, fcntl.LOCK_SH)
            size = os.fstat(fd).st_size
            out.sendall(b"F %d %s\n" % (size, name))
            offset = 0
            while offset < size:
                sent = os.sendfile(out.fileno(), fd, offset, size - offset)
                if sent == 0:  # the file shrank under us: the stream cannot continue
                    raise ConnectionAbortedError(f"{relative} shrank while being sent")
                offset += sent
        finally:
            os.close(fd)  # releases the lock


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise CarbonscaleError(f"address {text!r}: port must be a number in 1-65535")
    return host, int(port)


def make_server(
    listen: str, root: str, secret: bytes, allow: list, status: Callable[[], dict] | None = None
) -> FileServer:
    if not os.path.isdir(root):
        raise CarbonscaleError(f"whisper root {root} is not a directory")
    host, port = parse_listen(listen)
    try:
        return FileServer((host, port), root, secret, allow, status)
    except OSError as exc:
        raise CarbonscaleError(f"cannot listen on {listen}: {exc.strerror}") from exc


# ----- the client ---------------------------------------------------------------


class SourceUnreachable(CarbonscaleError):
    """A host's service cannot be reached or refused us: the run stops and names it."""


class Client:
    """Requests to one host's service."""

    def __init__(self, host: str, endpoint: str, secret: bytes, timeout: float = 60.0) -> None:
        self.host = host
        self.address, self.port = parse_listen(endpoint)
        self.endpoint = endpoint
        self.secret = secret
        self.timeout = timeout
        self.source_address: tuple[str, int] | None = None  # tests: speak from another address

    def _request(self, method: str, path: str, body: bytes = b"") -> http.client.HTTPResponse:
        stamp = str(int(time.time()))
        headers = {
            HEADER_TIME: stamp,
            HEADER_SIGNATURE: sign(self.secret, method, path, stamp, body),
            "Content-Length": str(len(body)),
        }
        connection = http.client.HTTPConnection(
            self.address, self.port, timeout=self.timeout, source_address=self.source_address
        )
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise SourceUnreachable(
                f"host {self.host} ({self.endpoint}) is unreachable: {why}"
            ) from exc
        if response.status != 200:
            why = response.read(200).decode(errors="replace").strip()
            connection.close()
            raise SourceUnreachable(
                f"host {self.host} ({self.endpoint}) refused the request: {response.status} {why}"
            )
        return response

    def listing(self) -> Listing:
        response = self._request("GET", "/list")
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise SourceUnreachable(f"host {self.host} ({self.endpoint}): {exc}") from exc
        return decode_listing(data, f"listing of {self.host}")

    def status(self) -> dict:
        return json.loads(self._request("GET", "/status").read())

    def files(self, paths: list[str]) -> Iterator[tuple[str, bytes | None, str]]:
        """(path, bytes, "") or (path, None, reason) for every path, in order."""
        body = "\n".join(paths).encode("utf-8", "surrogateescape")
        response = self._request("POST", "/files", body)
        try:
            for _ in paths:
                line = response.readline(1 << 16)
                if line.startswith(b"F "):
                    _, size, name = line.rstrip(b"\n").split(b" ", 2)
                    data = _read_exactly(response, int(size))
                    yield name.decode("utf-8", "surrogateescape"), data, ""
                elif line.startswith(b"E "):
                    name, _, reason = line[2:].rstrip(b"\n").partition(b"\t")
                    yield name.decode("utf-8", "surrogateescape"), None, reason.decode()
                else:
                    raise http.client.IncompleteRead(line)
            if response.readline(16) != b"END\n":
                raise http.client.IncompleteRead(b"")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise SourceUnreachable(
                f"host {self.host} ({self.endpoint}) broke off a transfer: "
                f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
            ) from exc
        finally:
            response.close()


def _read_exactly(response: http.client.HTTPResponse, size: int) -> bytes:
    data = response.read(size)
    if len(data) != size:
        raise http.client.IncompleteRead(data, size - len(data))
    return data
