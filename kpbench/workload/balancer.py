"""A small TCP balancer that stands in for a Service on loopback (tests and the benchmark).

    python -m kpbench.workload.balancer --listen 127.0.0.1:0 --backend 127.0.0.1:8081 ...

Each accepted connection goes to a backend picked uniformly at random (as kube-proxy's iptables
rules pick); a backend that refuses is skipped for that connection (as if its endpoint had been
withdrawn) and the others are tried in random order; if none accepts, the client connection is
reset. Bytes are piped both ways; a reset on one side resets the other. It prints one JSON line
`{"event": "listening", "port": P}` once it accepts, and exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import sys
from collections.abc import Sequence


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                other: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()
        other.transport.abort()


async def _handle(backends: list[tuple[str, int]], client_reader: asyncio.StreamReader,
                  client_writer: asyncio.StreamWriter) -> None:
    candidates = random.sample(backends, len(backends))
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    for host, port in candidates:
        try:
            upstream = await asyncio.open_connection(host, port)
            break
        except OSError:
            continue
    if upstream is None:
        client_writer.transport.abort()
        return
    upstream_reader, upstream_writer = upstream
    for writer in (client_writer, upstream_writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(
        _pipe(client_reader, upstream_writer, client_writer),
        _pipe(upstream_reader, client_writer, upstream_writer),
    )
    for writer in (client_writer, upstream_writer):
        writer.close()


async def serve(listen: tuple[str, int], backends: list[tuple[str, int]]) -> None:
    server = await asyncio.start_server(
        lambda r, w: _handle(backends, r, w), listen[0], listen[1], reuse_address=True,
        backlog=4096,
    )
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "listening", "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kpbench.workload.balancer")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--backend", action="append", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    try:
        listen = _address(args.listen)
        backends = [_address(b) for b in args.backend]
    except ValueError:
        print("balancer: addresses must be HOST:PORT", file=sys.stderr)
        return 2
    asyncio.run(serve(listen, backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
