"""slimpipe: SlimPipe pipeline parallelism for long-context LLM training (arXiv 2504.14519).

The planning core (``slimpipe.schedule``, ``slimpipe.sim``, ``slimpipe.planner``, ``slimpipe.config``)
imports no torch; ``slimpipe.runtime`` and ``slimpipe.models`` do.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
