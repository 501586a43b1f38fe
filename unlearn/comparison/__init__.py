"""Orchestration above `unlearn.train.run`: many methods side by side (`compare`), and sequential erasure."""

from unlearn.comparison.plan import CompareError, Run, plan_runs

__all__ = ["CompareError", "Run", "plan_runs"]
