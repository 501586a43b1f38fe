from unlearn.evaluation.evaluator import Evaluator
from unlearn.evaluation.table import format_table

__all__ = ["Evaluator", "format_table"]
