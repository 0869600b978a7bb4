"""A minimal HTTP/1.1 keep-alive client on one socket: exactly one connection, no retries.

Used by the Locust HTTP user (under gevent's monkey-patching its sockets cooperate). Off-the-shelf
clients pool sockets and silently retry a request on a fresh connection when the kept one was
closed, which would hide exactly the reconnects this project measures.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

MAX_HEADER_BYTES = 64 * 1024


class ConnectionLost(Exception):
    """The connection broke before a complete response; `reason` is `reset`."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def keep_alive(self) -> bool:
        return "close" not in self.headers.get("connection", "").lower()


class Http1Connection:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host_header = host if port == 80 else f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.pending = b""

    def peer_state(self) -> str | None:
        """Without blocking: None if the connection looks usable, else `eof` or `reset`."""
        sock = self.sock
        try:
            sock.settimeout(0.0)
            data = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError:
            return "reset"
        finally:
            sock.settimeout(self.timeout)
        return "eof" if data == b"" else "reset"  # unsolicited bytes: the stream is broken

    def get(self, path: str) -> Response:
        request = (f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                   "User-Agent: kpbench\r\n\r\n").encode()
        try:
            self.sock.sendall(request)
            return self._read_response()
        except (OSError, ValueError) as exc:
            raise ConnectionLost(f"{exc.__class__.__name__}: {exc}") from None

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionLost("connection closed before a complete response")
        return chunk

    def _read_response(self) -> Response:
        data = self.pending
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_HEADER_BYTES:
                raise ConnectionLost("response header too long")
            data += self._recv()
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ConnectionLost("chunked responses are not supported")
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += self._recv()
        self.pending = rest[length:]
        return Response(status, headers, rest[:length])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
