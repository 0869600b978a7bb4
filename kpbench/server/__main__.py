"""`python -m kpbench.server`: flags, or the matching `KPBENCH_*` environment variables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from kpbench.server.app import ServerSettings, serve

EXIT_INVALID = 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


def _optional_port(text: str) -> int | None:
    return None if text.strip() in ("", "none", "off") else _port(text)


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError
    return value


def _optional_positive(text: str) -> float | None:
    if text.strip() in ("", "none", "null"):
        return None
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError
    return value


# flag -> (environment variable, parser, default, meaning of a bad value)
OPTIONS: dict[str, tuple[str, Callable[[str], Any], Any, str]] = {
    "pod-name": ("KPBENCH_POD_NAME", str, None, "a non-empty name"),
    "node-name": ("KPBENCH_NODE_NAME", str, "", "a name"),
    "host": ("KPBENCH_HOST", str, "0.0.0.0", "an address"),
    "port": ("KPBENCH_PORT", _port, 8080, "a port 0..65535"),
    "grpc-port": ("KPBENCH_GRPC_PORT", _optional_port, 9090, "a port 0..65535 or 'off'"),
    "admin-port": ("KPBENCH_ADMIN_PORT", _optional_port, None, "a port 0..65535 or 'off'"),
    "max-connection-age-seconds": ("KPBENCH_MAX_CONNECTION_AGE_SECONDS", _optional_positive,
                                   None, "a number > 0 or 'none'"),
    "cpu-per-request-millicores": ("KPBENCH_CPU_PER_REQUEST_MILLICORES", _non_negative, 0.0,
                                   "a number >= 0"),
    "shutdown-drain-seconds": ("KPBENCH_SHUTDOWN_DRAIN_SECONDS", _non_negative, 1.0,
                               "a number >= 0"),
}


def parse_settings(argv: Sequence[str], environ: dict[str, str]) -> ServerSettings:
    parser = _Parser(prog="python -m kpbench.server", description="kpbench backend server")
    for flag, (variable, _, default, meaning) in OPTIONS.items():
        parser.add_argument(f"--{flag}", default=None,
                            help=f"{meaning} (env {variable}, default {default!r})")
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for flag, (variable, convert, default, meaning) in OPTIONS.items():
        text = args[flag.replace("-", "_")]
        source = f"--{flag}"
        if text is None and variable in environ:
            text, source = environ[variable], variable
        if text is None:
            values[flag.replace("-", "_")] = default
            continue
        try:
            values[flag.replace("-", "_")] = convert(text)
        except ValueError:
            raise UsageError(f"{source}: must be {meaning}, got {text!r}") from None
    if not values["pod_name"]:
        raise UsageError("--pod-name (or KPBENCH_POD_NAME): required")
    return ServerSettings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv, dict(os.environ))
    except UsageError as exc:
        print(f"kpbench.server: {exc}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"kpbench.server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
