"""Benchmarks and measurement scripts, run from the repository root as modules: `python -m benchmarks.<name>`.

Not part of the installed `llmstages` package; `fault_injection.KillAtStep` is used
by tests and `benchmarks.invariance` as the class path `benchmarks.fault_injection.KillAtStep`
(the repository root on PYTHONPATH).
"""
