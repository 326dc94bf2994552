"""Configurations and tiny builders, pipeline assembly, the tiny tokenizer."""
