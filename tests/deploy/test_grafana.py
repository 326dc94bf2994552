"""The Grafana dashboard covers what operators watch, through the provisioned datasource.

That every expression returns data from a live service is proven in
tests/metrics/test_live_prometheus.py against a real Prometheus server."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.deploy.conftest import DASHBOARD, DEPLOY


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [panel for panel in panels if panel["type"] != "row"]


def _exprs() -> list[str]:
    return [target["expr"] for panel in _panels() for target in panel["targets"]]


def test_every_panel_uses_the_provisioned_datasource() -> None:
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    for panel in _panels():
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            assert target["expr"].strip()


def test_dashboard_covers_the_issue() -> None:
    exprs = "\n".join(_exprs())
    for needle in (
        "spasemsr_queue_depth",
        "spasemsr_queue_oldest_age_seconds",
        "histogram_quantile(0.5, sum by (le) (rate(spasemsr_queue_wait_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(spasemsr_queue_wait_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(spasemsr_queue_wait_seconds_bucket",
        "by (le, stage) (rate(spasemsr_inference_seconds_bucket",
        "sum by (outcome) (rate(spasemsr_jobs_total",
        "max by (state) (spasemsr_workers)",
        "spasemsr_gpu_memory_bytes",
        "spasemsr_gpu_utilization_ratio",
        'spasemsr_http_requests_total{status=~"[45].."}',
        "spasemsr_uploads_rejected_total",
    ):
        assert needle in exprs, needle


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    layout = json.loads(DASHBOARD.read_text())["panels"]
    for panel in layout:
        grid = panel["gridPos"]
        cells = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & taken, panel["title"]
        assert grid["x"] + grid["w"] <= 24
        taken |= cells
    ids = [panel["id"] for panel in layout]
    assert len(ids) == len(set(ids))
