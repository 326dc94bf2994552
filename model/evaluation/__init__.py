"""Evaluation: the benchmark protocol, metrics, the real-photo evaluation."""
