"""What "an expression returns data" means for alert expressions.

An alert expression such as ``A > 0 and on () (B or vector(0)) == 0`` is empty whenever the
alert is silent, which is the healthy case. The parts that must have data are the measured
series: thresholds are stripped, set operations are split, ``vector(...)`` fallbacks dropped
and ``absent(X)`` checked as ``X``.
"""

from __future__ import annotations

import re

_SET_OPERATOR = re.compile(r"\s+(?:and|or|unless)(?:\s+(?:on|ignoring)\s*\([^)]*\))?\s+")
_THRESHOLD = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?-?[0-9.]+(?:e[+-]?[0-9]+)?\s*$")


def _split_top_level(expr: str) -> list[str]:
    parts: list[str] = []
    depth = start = i = 0
    while i < len(expr):
        char = expr[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := _SET_OPERATOR.match(expr, i)):
            parts.append(expr[start:i])
            start = i = match.end()
            continue
        i += 1
    parts.append(expr[start:])
    return parts


def _strip_outer_parentheses(expr: str) -> str:
    while expr.startswith("(") and expr.endswith(")"):
        depth = 0
        for index, char in enumerate(expr):
            depth += char == "("
            depth -= char == ")"
            if depth == 0 and index < len(expr) - 1:
                return expr
        expr = expr[1:-1].strip()
    return expr


def data_queries(expr: str) -> list[str]:
    expr = _strip_outer_parentheses(" ".join(expr.split()))
    parts = _split_top_level(expr)
    if len(parts) > 1:
        return [query for part in parts for query in data_queries(part)]
    without_threshold = _THRESHOLD.sub("", expr)
    if without_threshold != expr:
        return data_queries(without_threshold)
    if re.fullmatch(r"vector\([^()]*\)", expr):
        return []
    absent = re.fullmatch(r"absent\((.*)\)", expr)
    if absent:
        return data_queries(absent.group(1))
    return [expr]
