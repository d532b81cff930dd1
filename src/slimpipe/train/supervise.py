"""The launcher's side of a local run: wait for the ranks, pass signals on, end them all, say why once.

``supervise`` polls the rank processes. The first failure starts a short grace period in which the other
ranks stop by themselves (their watchdogs or a closed connection tell them; they exit PEER quietly);
whatever still runs after it is killed, and a rank that never exited by itself is named as the one that
stopped responding (a SIGSTOPped or hung rank, never the healthy one that noticed). A SIGTERM/SIGINT to
the launcher is passed to every rank, which exits at once. ``report`` prints the one line. No torch.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimpipe.train.exits import BAD_INPUT, DIVERGED, FAILED, OK, PEER, SAVE_FAILED

__all__ = ["Outcome", "supervise", "report", "GRACE_S"]

GRACE_S = 5.0
"""Seconds the other ranks get to stop by themselves after a failure or a forwarded signal."""
_AGREED = (BAD_INPUT, DIVERGED, SAVE_FAILED)


@dataclass(slots=True)
class Outcome:
    """How the ranks ended."""

    codes: dict[int, int] = field(default_factory=dict)
    """Exit code per rank (negative: killed by that signal)."""
    order: list[int] = field(default_factory=list)
    """Ranks in the order they were seen to exit."""
    killed: dict[int, str] = field(default_factory=dict)
    """Ranks the launcher killed after the grace period, with their process state then (R, S, T, ...)."""
    signal: int | None = None
    """The signal the launcher received and forwarded, if any."""
    stop_s: float = 0.0
    """Seconds from the first failure (or the signal) until every rank had ended."""


def supervise(procs: list[Any], received: list[int], *, poll_s: float = 0.05) -> Outcome:
    """Wait for every rank; ``received`` fills with signals the launcher caught (signals.forward_signals)."""
    out = Outcome()
    started = deadline = float("inf")
    while len(out.codes) < len(procs):
        now = time.monotonic()
        if received and out.signal is None:
            out.signal, started, deadline = received[0], now, now + GRACE_S
            for r, p in enumerate(procs):
                if r not in out.codes:
                    _send(p, received[0])
        for r, p in enumerate(procs):
            if r not in out.codes and p.exitcode is not None:
                out.codes[r] = p.exitcode
                out.order.append(r)
                if p.exitcode != OK and started == float("inf"):
                    started, deadline = now, now + GRACE_S
        alive = [r for r in range(len(procs)) if r not in out.codes]
        if out.codes and alive and all(c == PEER for c in out.codes.values()):
            deadline = min(deadline, now + 1.0)  # everyone else stopped because of these: no need to wait
        if now > deadline:
            for r, p in enumerate(procs):
                if r not in out.codes:
                    out.killed[r] = _state(p.pid)
                    p.kill()
                    p.join()
                    out.codes[r] = p.exitcode
            break
        time.sleep(poll_s)
    for p in procs:
        p.join()
    out.stop_s = max(0.0, time.monotonic() - started) if started != float("inf") else 0.0
    return out


def report(out: Outcome, cfg: Any) -> int:
    """Print the one line a failed or stopped run ends with; return the launcher's exit code."""
    progress = _progress(cfg)
    if out.signal is not None:
        name = signal.Signals(out.signal).name
        _say(f"stopped by {name}: {len(out.codes)} rank(s) ended within {out.stop_s:.1f} s; {progress}; "
             f"{_resume_hint(cfg)}")
        return 128 + out.signal
    failed = {r: c for r, c in out.codes.items() if c != OK}
    if not failed:
        return OK
    if len(failed) == len(out.codes) and len(set(failed.values())) == 1 and failed[0] in _AGREED:
        return failed[0]  # every rank reached the same failure; rank 0 said why
    culprit, what = _culprit(out)
    others = sorted(r for r in failed if r != culprit)
    _say(f"error: rank {culprit} {what}; {len(others)} other rank(s) {others} stopped within "
         f"{out.stop_s:.1f} s; {progress}; {_resume_hint(cfg)}")
    return FAILED


def _culprit(out: Outcome) -> tuple[int, str]:
    """The rank that failed first by itself, else the one that never exited by itself."""
    for r in out.order:
        code = out.codes[r]
        if code not in (OK, PEER) and r not in out.killed:
            return r, _describe(code)
    if out.killed:
        r = min(out.killed)
        state = out.killed[r]
        how = ("was stopped (process state T: SIGSTOP or a debugger)" if state == "T"
               else f"hung (process state {state})")
        return r, f"{how}, so the launcher killed it"
    r = out.order[0]
    return r, _describe(out.codes[r])


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {_signame(-code)}"
    if code > 128:
        return f"was stopped by {_signame(code - 128)} (exit code {code})"
    if code == FAILED:
        return "failed (its message is above)"
    return f"exited with code {code}"


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _progress(cfg: Any) -> str:
    """How far the run got, from the partial JSON log rank 0 writes."""
    try:
        lines = [ln for ln in Path(cfg.log_json + ".partial").read_text().splitlines() if ln.strip()]
        return f"the last finished step was {json.loads(lines[-1])['step']} of {cfg.steps}" if lines else \
            "no step had finished"
    except (OSError, ValueError, KeyError):
        return "no step had finished"


def _resume_hint(cfg: Any) -> str:
    latest = Path(cfg.checkpoint_dir) / "latest"
    kept = f"nothing published ({Path(cfg.log_json).name}.partial kept)"
    if cfg.checkpoint_every and latest.is_file():
        step = latest.read_text(errors="replace").strip()
        return f"{kept}: continue from {step} with --resume"
    hint = "" if cfg.checkpoint_every else " (--checkpoint-every N makes a run resumable)"
    return f"{kept}: rerun it{hint}"


def _send(proc: Any, signum: int) -> None:
    try:
        os.kill(proc.pid, signum)
    except (ProcessLookupError, TypeError):  # ended meanwhile
        pass


def _state(pid: int) -> str:
    """The process state letter from /proc (R running, S sleeping, T stopped, Z zombie); '?' elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _say(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"slimpipe train: {text}\n")
    sys.stderr.flush()
