"""How a rank ends when it is told to (SIGTERM, SIGINT) or when its launcher dies. No torch.

A rank spends most of its time inside blocking collectives, where a Python signal handler would not run
until the peer answers. So a rank process blocks SIGTERM and SIGINT in its main thread before any other
thread exists (gloo and OpenMP threads inherit the mask) and one small thread waits for them with
``sigwaitinfo``: the process ends at once, with the shell's code 128 + signal, publishing nothing (every
output of a run is written under a ``.partial`` name until the run succeeds).

A rank also ends when its launcher dies, even by SIGKILL: Linux delivers a chosen signal on parent death
(``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread polls the parent pid once a second.

The launcher itself (a process the user or a scheduler signals) keeps ordinary Python handlers
(``forward_signals``): it passes the signal on to every rank, waits for them, and reports once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["exit_on_signals", "die_with_parent", "forward_signals", "raise_on_signals", "Stopped",
           "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def exit_on_signals(describe: Callable[[int], str] | None) -> None:
    """In a rank process, before it starts any thread: end at once on SIGTERM/SIGINT with 128 + signum.

    ``describe(signum)`` gives the one line to print (a rank under torchrun says why it stopped); None
    stays silent (a rank under `slimpipe train --nproc`, whose launcher reports).
    """
    for s in STOP_SIGNALS:  # a thread that predates the mask and takes the signal ends the process plainly
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def wait() -> None:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if describe is not None:
            sys.stdout.flush()
            sys.stderr.write(describe(info.si_signo) + "\n")
            sys.stderr.flush()
        os._exit(128 + info.si_signo)

    threading.Thread(target=wait, name="slimpipe-signals", daemon=True).start()


def die_with_parent(expected_parent: int) -> None:
    """End this process (SIGKILL) when its parent dies, so no rank outlives its launcher."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: no prctl
        ok = False
    if os.getppid() != expected_parent:  # the parent died before the request took effect
        os._exit(128 + signal.SIGKILL)
    if not ok:
        threading.Thread(target=_watch_parent, args=(expected_parent,), name="slimpipe-parent",
                         daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(128 + signal.SIGKILL)


@contextlib.contextmanager
def forward_signals() -> Iterator[list[int]]:
    """While active, SIGTERM/SIGINT to this process are recorded (in the yielded list) instead of acting;
    the caller forwards them. Outside the main thread (no handlers allowed) nothing is recorded."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Stopped(BaseException):
    """SIGTERM/SIGINT in a single-process run (a BaseException: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)  # args = (signum,): survives pickling (DCP gathers a rank's exception)
        self.signum = int(signum)

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """While active, SIGTERM/SIGINT raise Stopped in the main thread (a one-process run has no peer to
    block on, so a Python handler runs promptly). Outside the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
