from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .loopback import REPOSITORY, Processes

EXPERIMENTS = REPOSITORY / "experiments"


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
