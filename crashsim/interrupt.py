"""Stopping a run cleanly: SIGTERM acts as Ctrl-C, saving holds both off, and worker
processes leave the stopping to their parent.

A ``crashsim run`` that is interrupted keeps what it has judged: the parent catches
``KeyboardInterrupt``, stops its workers and writes a partial report. Those writes run
under ``held()`` so that a signal cannot cut them short; it is acted on after.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class sigterm_as_interrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt as SIGINT does."""

    def __enter__(self) -> "sigterm_as_interrupt":
        self._old = None
        if _main_thread():
            self._old = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class held:
    """Within the block, SIGINT and SIGTERM are noted in ``noted``, not acted on; the
    caller decides what a noted signal means once the block is done. A signal ignored
    on entry (a background job's SIGINT, under nohup) stays ignored."""

    def __enter__(self) -> "held":
        self.noted: list[int] = []
        self._old: dict[int, object] = {}
        if _main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.noted.append(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class stop_signals_blocked:
    """Within the block, SIGINT and SIGTERM wait in the kernel. Workers are forked inside
    it: a worker starts with them blocked and takes them once its own handlers are set
    (``quiet_worker_signals``). Before, a pool stopping a worker that was still starting
    could run the parent's handler in it, which printed a KeyboardInterrupt traceback."""

    def __enter__(self) -> "stop_signals_blocked":
        self._old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


def quiet_worker_signals() -> None:
    """In a worker process: Ctrl-C is the parent's to handle (it stops the pool), and
    SIGTERM ends the process, whatever handler was inherited from the parent; then the
    signals held off since the fork (``stop_signals_blocked``) are let through."""
    signal.signal(signal.SIGINT, _ignore)  # a handler, not SIG_IGN: exec resets it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _ignore(signum: int, frame: FrameType | None) -> None:
    pass
