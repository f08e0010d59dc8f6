"""Evaluation: the confusion matrix and metrics, evaluation runs, reports, the retrain decision."""
