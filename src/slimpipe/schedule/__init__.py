"""Schedules as data: the IR (actions), builders, lowering passes, validator and text formats.

Imports no torch.
"""
from slimpipe.schedule.actions import COMM_KINDS, COMPUTE_KINDS, Action, Kind, Schedule, parse_action

__all__ = ["Action", "Kind", "Schedule", "parse_action", "COMPUTE_KINDS", "COMM_KINDS"]
