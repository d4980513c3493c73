"""What clients send PostgreSQL, message by message: a pass-through on its Unix socket.

``Wire`` listens on a socket of its own that forwards every byte, unchanged, to the real
server, and reads the frontend messages as they go by. A client waits for the server only
after a Sync or a simple Query (asyncpg never pipelines past one), so those messages count
its round trips. Nothing is answered by the pass-through: PostgreSQL answers everything.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

# Requests that come before the startup message, without a type byte (SSL, GSSAPI).
_PRE_STARTUP = {80877103, 80877104}


class Wire:
    """A pass-through to the server of ``dsn`` (host= a socket directory); ``dsn`` is its own."""

    def __init__(self, dsn: str) -> None:
        base, _, query = dsn.partition("?")
        options = dict(part.split("=", 1) for part in query.split("&") if part)
        upstream_dir = Path(options["host"])
        sockets = [p for p in upstream_dir.glob(".s.PGSQL.*") if not p.name.endswith(".lock")]
        assert len(sockets) == 1, sockets
        self.upstream = sockets[0]
        # Short: a Unix socket's path has room for about 100 bytes.
        self.directory = Path(tempfile.mkdtemp(prefix="qgwire"))
        options["host"] = str(self.directory)
        self.dsn = base + "?" + "&".join(f"{k}={v}" for k, v in options.items())
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.directory / self.upstream.name))
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._sent: list[tuple[str, str]] | None = None
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, str]]]:
        """The messages every client sends meanwhile: (type, SQL text for a Query or a
        Parse, else "")."""
        sent: list[tuple[str, str]] = []
        with self._lock:
            self._sent = sent
        try:
            yield sent
        finally:
            with self._lock:
                self._sent = None

    def close(self) -> None:
        """Stop listening and cut every connection (close their clients first)."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of _accept
        self._listener.close()
        with self._lock:
            open_, self._open = self._open, []
        for sock in open_:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(str(self.upstream))
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._relay, args=(server, client), daemon=True).start()
            threading.Thread(target=self._frontend, args=(client, server), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _frontend(self, client: socket.socket, server: socket.socket) -> None:
        buffer = b""
        started = False
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                # Recorded before it is forwarded: a message is on record before its answer.
                buffer += data
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack("!ii", buffer[:8])
                        if len(buffer) < length:
                            break
                        started = code not in _PRE_STARTUP
                        buffer = buffer[length:]
                        continue
                    if len(buffer) < 5:
                        break
                    kind = buffer[:1].decode()
                    (length,) = struct.unpack("!i", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    body = buffer[5 : 1 + length]
                    buffer = buffer[1 + length :]
                    if kind == "Q":
                        text = body.rstrip(b"\x00").decode()
                    elif kind == "P":  # the statement's name, then its text
                        text = body.split(b"\x00", 2)[1].decode()
                    else:
                        text = ""
                    with self._lock:
                        if self._sent is not None:
                            self._sent.append((kind, text))
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)


def round_trips(sent: list[tuple[str, str]]) -> int:
    """How many times the clients waited for the server: its Syncs and simple Queries."""
    return sum(1 for kind, _ in sent if kind in ("S", "Q"))
