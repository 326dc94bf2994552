"""The Grafana dashboard covers what operators watch, through the provisioned datasource.

That every expression returns data from a live service is proven in
tests/metrics/test_live_prometheus.py against a real Prometheus server."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.deploy.conftest import DASHBOARD, DEPLOY

# The series that carry a bounded `model` label (API: queues; worker: everything per job and
# per model). tests/metrics/test_live_prometheus.py checks this is exactly what is exported.
MODEL_LABELLED = (
    "spasemsr_queue_depth",
    "spasemsr_queue_oldest_age_seconds",
    "spasemsr_queue_wait_seconds",
    "spasemsr_inference_seconds",
    "spasemsr_jobs_total",
    "spasemsr_model_warm",
    "spasemsr_model_info",
)
MODEL_FILTER = 'model=~"$model"'


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
        "sum by (le, model, queue) (rate(spasemsr_queue_wait_seconds_bucket",
        "by (le, model, stage) (rate(spasemsr_inference_seconds_bucket",
        "sum by (model, outcome) (rate(spasemsr_jobs_total",
        "max by (model, queue) (spasemsr_queue_depth",
        "sum by (model) (spasemsr_model_warm",
        "spasemsr_model_info",
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


def test_model_variable_lists_the_models_of_the_queues() -> None:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    model = next(v for v in variables if v["name"] == "model")
    assert model["type"] == "query"
    assert model["datasource"]["uid"] == "spasemsr-prometheus"
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == model["definition"] == "label_values(spasemsr_queue_depth, model)"
    assert model["multi"] is True and model["includeAll"] is True
    assert model["current"]["value"] == ["$__all"]
    assert model["refresh"] in (1, 2)  # on load / on time range change: new models appear


_SELECTOR = re.compile(r"\b(spasemsr_[a-z_]+?)(_bucket|_count|_sum)?\b(\{[^}]*\})?")


def test_every_model_labelled_series_is_filtered_by_the_variable() -> None:
    """Each selector of a series with a `model` label honours the dashboard's model choice."""
    filtered = 0
    for panel in _panels():
        for target in panel["targets"]:
            for match in _SELECTOR.finditer(target["expr"]):
                if match.group(1) in MODEL_LABELLED:
                    assert MODEL_FILTER in (match.group(3) or ""), (panel["title"], match[0])
                    filtered += 1
                else:
                    assert "model" not in (match.group(3) or ""), (panel["title"], match[0])
    assert filtered >= 10


def test_model_panels_split_by_model() -> None:
    """A panel showing one line per series of a model-labelled metric names the model."""
    for panel in _panels():
        for target in panel["targets"]:
            expr = target["expr"]
            grouping = re.findall(r"by \(([^)]*)\)", expr)
            if MODEL_FILTER in expr and grouping and grouping != ["le"]:
                assert all("model" in group for group in grouping), (panel["title"], expr)
                legend = target.get("legendFormat", "")
                assert "{{model}}" in legend or target.get("format") == "table", panel["title"]
