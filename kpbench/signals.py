"""SIGINT and SIGTERM stop kpbench the same way, wherever they arrive.

Inside `handled()` both signals raise `Interrupted` (a KeyboardInterrupt) in the main thread. Only
the first signal raises: later ones, which arrive while kpbench is already stopping (closing a
backend, recording the run's status), are ignored, so a double Ctrl-C cannot break the cleanup.
Inside `deferred()` (the commit of a cell's results) a signal is held until the block ends, so a
commit is never cut in half.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by SIGINT or SIGTERM; `signum` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class _State:
    installed = 0  # nesting depth of handled()
    received: int | None = None
    raised = False
    deferring = 0  # nesting depth of deferred()


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.received is not None:
        return  # already stopping: the cleanup in progress must finish
    _state.received = signum
    if not _state.deferring:
        _state.raised = True
        raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def handled(final: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` (once) while the block runs; nests. `final`: the
    process exits after the block, so both signals are then ignored instead of restored."""
    if not _main_thread():
        yield
        return
    previous = None
    if not _state.installed:
        _state.received, _state.raised, _state.deferring = None, False, 0
        previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    _state.installed += 1
    try:
        yield
    finally:
        _state.installed -= 1
        if previous is not None:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_IGN if final else handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise `Interrupted` if one came."""
    if not _main_thread() or not _state.installed:
        yield
        return
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if not _state.deferring and _state.received is not None and not _state.raised:
            _state.raised = True
            raise Interrupted(_state.received)


def stopping() -> bool:
    """True once a signal has been received inside `handled()`."""
    return _state.received is not None
