"""The helper that turns alert expressions into the queries that must return data."""

from __future__ import annotations

from tests.metrics.promql import data_queries


def test_thresholds_and_set_operations_are_taken_apart() -> None:
    assert data_queries("min(spasemsr_redis_up) < 1") == ["min(spasemsr_redis_up)"]
    assert data_queries(
        "max by (queue) (spasemsr_queue_depth) > 0\nand on ()\n"
        "(sum(increase(spasemsr_jobs_total[30m])) or vector(0)) == 0"
    ) == ["max by (queue) (spasemsr_queue_depth)", "sum(increase(spasemsr_jobs_total[30m]))"]
    assert data_queries('sum(rate(a{s=~"5.."}[5m])) / sum(rate(a[5m])) > 0.05') == [
        'sum(rate(a{s=~"5.."}[5m])) / sum(rate(a[5m]))'
    ]
    assert data_queries("absent(up{job='x'})") == ["up{job='x'}"]
    assert data_queries("(a) / (b)") == ["(a) / (b)"]
    assert data_queries("sum by (reason) (rate(x[1m])) > 0") == ["sum by (reason) (rate(x[1m]))"]
