"""Benchmark scripts (not part of the installed package). Each is a script: ``python bench/NAME.py`` from
the repository root; the ones that import a sibling module (vs_torch_pipelining) run as
``python -m bench.NAME``. Tests import their cores as ``bench.NAME``."""
