"""Evaluations: fact recall with live tool calls (:mod:`lmlab.evals.recall`)."""

from lmlab.evals.recall import RecallQuestion, evaluate_recall, judge, load_questions, parse_answer, run_recall_sets

__all__ = ["RecallQuestion", "evaluate_recall", "judge", "load_questions", "parse_answer", "run_recall_sets"]
