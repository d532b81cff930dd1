"""The schedule errors: ScheduleError with its marked grid, and the one structured deadlock result.

Every check, pass and engine run that finds a schedule at fault raises :class:`ScheduleError`: it names the
check, says what is wrong and ends with the rank × step grid, the faulty cells marked. A run where no rank
can progress raises :class:`DeadlockError`, a ScheduleError that also carries the stuck actions as data
(:class:`Stuck`: rank, step, action, what it waits for), so callers never parse its message.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from slimpipe.schedule.actions import Action, Schedule
from slimpipe.schedule.format import to_grid

__all__ = ["ScheduleError", "DeadlockError", "Stuck", "GRID_WINDOW"]

GRID_WINDOW = 12
"""Steps shown on each side of a marked step in error grids."""


class ScheduleError(ValueError):
    """A schedule breaks an invariant. ``check`` names the check; ``marks`` are the (rank, step) cells at
    fault; ``grid`` is the marked rank × step grid the message ends with."""

    def __init__(
        self, check: str, message: str, schedule: Schedule, marks: Collection[tuple[int, int]] = ()
    ) -> None:
        self.check = check
        self.marks = tuple(sorted(marks))
        self.grid = to_grid(schedule, marks=self.marks, window=GRID_WINDOW)
        super().__init__(f"{check}: {message}\n{self.grid}")


@dataclass(frozen=True, slots=True)
class Stuck:
    """One rank a deadlock left unfinished."""

    rank: int
    """The rank."""
    step: int
    """Position in its program of the action it cannot pass."""
    action: Action
    """That action."""
    waits_for: Action | None
    """What it waits for: the SEND of a RECV, a compute action's input, the partner's exchange marker;
    None for a collective (it waits for every rank to reach it)."""
    on_rank: int | None = None
    """The rank ``waits_for`` runs on, where one is meant."""


class DeadlockError(ScheduleError, RuntimeError):
    """No rank can progress. ``stuck``: every unfinished rank's blocked action and what it waits for.

    A RuntimeError too: the simulator raised a RuntimeError for deadlocks before the engines shared one
    result type."""

    def __init__(self, check: str, message: str, schedule: Schedule, stuck: Sequence[Stuck]) -> None:
        self.stuck = tuple(stuck)
        super().__init__(check, message, schedule, [(s.rank, s.step) for s in self.stuck])
