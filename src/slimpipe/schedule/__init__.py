"""Schedules as data: the IR (actions), builders, lowering passes, validator and text formats.

Imports no torch.
"""
from slimpipe.schedule.actions import (
    COMM_KINDS, COMPUTE_KINDS, Action, Kind, Schedule, ScheduleMeta, parse_action,
)
from slimpipe.schedule.format import from_csv, from_json, to_csv, to_grid, to_json
from slimpipe.schedule.dryrun import DryRunResult, dry_run
from slimpipe.schedule.passes import lower, peak_inflight
from slimpipe.schedule.validate import ScheduleError, validate

__all__ = [
    "Action", "Kind", "Schedule", "ScheduleMeta", "parse_action", "COMPUTE_KINDS", "COMM_KINDS",
    "ScheduleError", "validate", "lower", "dry_run", "DryRunResult", "peak_inflight",
    "to_grid", "to_csv", "from_csv", "to_json", "from_json",
]
