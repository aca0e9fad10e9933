"""A PostgreSQL proxy that notes every statement its clients send: what an idle worker costs the server.

The idle-worker scenario points the worker at this proxy instead of the server. It reads the
frontend side of the wire protocol (version 3): a simple query ('Q') is one statement, and in the
extended protocol each Execute ('E') runs the statement its portal was bound to (Parse 'P',
Bind 'B'). That counts what reaches the server, implicit BEGIN and COMMIT included, on any server
and without server settings (pg_stat_statements, log_statement) that a shared server may not
allow. Encryption is declined, so the proxy can read the messages: use it on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# Special codes of a startup packet that ask for encryption instead of a protocol version.
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


@dataclass(frozen=True)
class Statement:
    at: float  # time.monotonic() when the proxy read it
    connection: int  # the proxy's number for the client connection
    sql: str


@dataclass
class StatementProxy:
    """Listens on 127.0.0.1 (``port`` once started) and forwards each connection to ``upstream``:
    ``(host, port)`` or the path of a Unix socket."""

    upstream: tuple[str, int] | str
    statements: list[Statement] = field(default_factory=list)
    port: int = 0
    _listener: socket.socket | None = None
    _sockets: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _count: int = 0

    def __enter__(self) -> StatementProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="pgwire-accept", daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def between(self, start: float, end: float) -> list[Statement]:
        with self._lock:
            return [s for s in self.statements if start <= s.at < end]

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.upstream)
            return sock
        return socket.create_connection(self.upstream)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = self._connect_upstream()
            with self._lock:
                self._count += 1
                number = self._count
                self._sockets += [client, server]
            threading.Thread(target=self._frontend, args=(client, server, number), daemon=True).start()
            threading.Thread(target=_copy, args=(server, client), daemon=True).start()

    def _frontend(self, client: socket.socket, server: socket.socket, number: int) -> None:
        """Forward the client's messages to the server, noting each statement."""
        prepared: dict[bytes, str] = {}
        portals: dict[bytes, str] = {}
        try:
            while True:  # the startup packet: no type byte; encryption requests are declined
                length, code = struct.unpack("!ii", _read(client, 8))
                rest = _read(client, length - 8)
                if code in (SSL_REQUEST, GSSENC_REQUEST):
                    client.sendall(b"N")
                    continue
                server.sendall(struct.pack("!ii", length, code) + rest)
                break
            while True:
                head = _read(client, 5)
                kind, length = head[:1], struct.unpack("!i", head[1:])[0]
                body = _read(client, length - 4)
                server.sendall(head + body)
                if kind == b"Q":
                    self._note(number, body.rstrip(b"\0").decode(errors="replace"))
                elif kind == b"P":
                    name, query = body.split(b"\0", 2)[:2]
                    prepared[name] = query.decode(errors="replace")
                elif kind == b"B":
                    portal, name = body.split(b"\0", 2)[:2]
                    portals[portal] = prepared.get(name, "?")
                elif kind == b"E":
                    self._note(number, portals.get(body.split(b"\0", 1)[0], "?"))
                elif kind == b"X":
                    return
        except (OSError, struct.error, ConnectionError):
            return
        finally:
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _note(self, number: int, sql: str) -> None:
        with self._lock:
            self.statements.append(Statement(time.monotonic(), number, sql))


def _read(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _copy(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
