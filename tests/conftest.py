from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .loopback import REPOSITORY, Processes

EXPERIMENTS = REPOSITORY / "experiments"
LAB_MARKS = [  # every test module that drives the real lab
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("ip", "iptables-restore", "nft", "conntrack")),
        reason="the lab needs iproute2, iptables, nftables and conntrack",
    ),
]


@pytest.fixture
def repository() -> Path:
    return REPOSITORY


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Processes a test starts; every one is stopped when the test ends, even on failure."""
    started = Processes()
    try:
        yield started
    finally:
        started.stop_all()
