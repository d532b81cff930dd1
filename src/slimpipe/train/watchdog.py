"""Ending every rank of a job when one dies: heartbeats through the rendezvous store.

The watchdog: every rank writes a heartbeat counter to the store; rank 0 watches all counters, the other
ranks watch rank 0's, and the first rank to see a failure writes an ``abort`` message that every rank polls.
A rank that raises publishes its own failure; a rank that vanishes is named by the stale heartbeat (or, at
once, by the closed connection its peers see). A rank that stops because of another exits PEER (quietly
when our launcher supervises it and names the culprit itself). A process-group timeout remains the last
resort for a rank that is alive but stuck.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from slimpipe.train.exits import PEER

__all__ = ["Watchdog"]


class Watchdog:
    """Heartbeats through the rendezvous store; ``os._exit(PEER)`` with a message naming the dead rank
    (``quiet``: without it, when a supervising launcher reports)."""

    def __init__(self, store: Any, rank: int, world: int, *, stale_s: float, quiet: bool = False) -> None:
        import torch.distributed as dist

        self.store = dist.PrefixStore("slimpipe-watchdog", store)
        self.rank, self.world, self.stale_s, self.quiet = rank, world, stale_s, quiet
        self.interval = min(1.0, stale_s / 4)
        self._stop = threading.Event()
        self._published = False
        self._thread = threading.Thread(target=self._run, name="slimpipe-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def publish(self, message: str, *, own: bool = True) -> None:
        """Tell every rank to stop, naming the cause (the first published message wins).

        ``own=True``: this rank failed and its main thread reports it, so the watchdog lets it finish.
        """
        self._published = self._published or own
        try:
            self.store.compare_set("abort", "", message)
        except Exception:  # noqa: BLE001 - the store host may be the rank that died
            pass

    def abort_message(self) -> str | None:
        try:
            return self.store.get("abort").decode() if self.store.check(["abort"]) else None
        except Exception:  # noqa: BLE001
            return "rank 0 (the store host) is unreachable"

    def wait_for_cause(self) -> str | None:
        """After a communication error: wait up to stale_s for the watchdog to name a dead peer."""
        deadline = time.monotonic() + self.stale_s + 3 * self.interval
        while time.monotonic() < deadline:
            msg = self.abort_message()
            if msg:
                return msg
            time.sleep(self.interval / 2)
        return None

    def _run(self) -> None:
        watched = range(self.world) if self.rank == 0 else [0]
        last = {r: (b"", time.monotonic()) for r in watched if r != self.rank}
        beat = 0
        while not self._stop.wait(self.interval):
            beat += 1
            try:
                self.store.set(f"hb{self.rank}", str(beat))
                for r, (val, since) in last.items():
                    now_val = self.store.get(f"hb{r}") if self.store.check([f"hb{r}"]) else b""
                    if now_val != val:
                        last[r] = (now_val, time.monotonic())
                    elif time.monotonic() - since > self.stale_s:
                        self.publish(f"rank {r} stopped responding (no heartbeat for {self.stale_s:.0f} s)", own=False)
                msg = self.abort_message()
            except Exception:  # noqa: BLE001 - store gone: its host died
                msg = "rank 0 (the store host) is unreachable"
            if msg and not self._published:
                _die(self.rank, None if self.quiet else f"stopping: {msg}")
            elif msg and self._published and self._stop.wait(2 * self.stale_s):
                return  # the main thread is reporting our own failure; give it time to finish


def _die(rank: int, message: str | None) -> None:
    sys.stdout.flush()
    if message:
        sys.stderr.write(f"slimpipe train: rank {rank}: {message}\n")
    sys.stderr.flush()
    os._exit(PEER)
