"""A real Prometheus server scrapes the live API and two workers while jobs run: the exports
pass `promtool check metrics`, and every PromQL expression of the dashboard and of the alert
rules returns data (each names a metric the service really exports, with its real labels)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from core.models import ALL_MODELS
from tests.deploy.test_grafana import MODEL_LABELLED
from tests.metrics.conftest import DEPLOY, MODEL, RULES, WORKERS, Stack
from tests.metrics.promql import data_queries

# Grafana's variables, made concrete for a test that lasts seconds at a 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m"}
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spasemsr.json"


def _template_values(stack: Stack) -> dict[str, list[str]]:
    """Each `label_values(metric, label)` variable's values, as Grafana reads them."""
    values = {}
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
        assert found, variable["definition"]
        metric, label = found.groups()
        answer = httpx.get(
            f"{stack.prometheus_url}/api/v1/label/{label}/values",
            params={"match[]": metric},
            timeout=10,
        ).json()
        assert answer["status"] == "success", answer
        values[variable["name"]] = answer["data"]
    return values


def _dashboard_exprs(stack: Stack) -> list[str]:
    """The panels' queries with the template variables set to "All", as Grafana expands a
    multi-value variable in a regex matcher: (value1|value2|...)."""
    variables = {
        f"${name}": "(" + "|".join(values) + ")" for name, values in _template_values(stack).items()
    }
    exprs = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in {**GRAFANA_VARIABLES, **variables}.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, expr
            exprs.append(expr)
    return exprs


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [str(rule["expr"]) for group in groups for rule in group["rules"]]


def _queries(stack: Stack, *, gpu: bool) -> list[str]:
    exprs = _dashboard_exprs(stack) + _rule_exprs()
    queries = {q for expr in exprs for q in data_queries(expr)}
    return sorted(q for q in queries if ("spasemsr_gpu_" in q) == gpu)


def _without_data(stack: Stack, queries: list[str]) -> list[str]:
    return [query for query in queries if not stack.query(query)]


def test_every_dashboard_and_rule_expression_returns_data(stack: Stack) -> None:
    queries = _queries(stack, gpu=False)
    assert len(queries) >= 20
    # rate() needs two scrapes of a series inside its window: on a fast machine the jobs may
    # all end between the first scrapes, so give Prometheus a few more (1 s interval).
    deadline = time.monotonic() + 30
    missing = _without_data(stack, queries)
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = _without_data(stack, missing)
    assert missing == []


def test_gpu_expressions_return_data_from_a_cuda_worker(stack: Stack) -> None:
    exported = httpx.get(f"http://127.0.0.1:{stack.worker_ports[0]}/metrics").text
    if "spasemsr_gpu_memory_bytes" not in exported:
        pytest.skip(
            "no CUDA device here: workers export spasemsr_gpu_* only when the model runs on "
            f"CUDA, so these {len(_queries(stack, gpu=True))} GPU panel/alert queries are "
            "unchecked"
        )
    assert _without_data(stack, _queries(stack, gpu=True)) == []


@pytest.mark.parametrize("target", ["api", "worker"])
def test_live_metrics_pass_promtool_check_metrics(stack: Stack, target: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian's `prometheus` package provides it)")
    port = stack.service.port if target == "api" else stack.worker_ports[0]
    exported = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exported, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == checked.stderr.strip() == ""  # no lint remark at all


def test_the_model_variable_lists_every_model(stack: Stack) -> None:
    """The API exports every model's queues, served or not: the dashboard offers them all."""
    assert sorted(_template_values(stack)["model"]) == sorted(m.value for m in ALL_MODELS)


def test_scraped_values_follow_the_jobs(stack: Stack) -> None:
    jobs = stack.jobs
    assert stack.value('sum(spasemsr_jobs_total{outcome="succeeded"})') == jobs
    assert stack.value('sum(spasemsr_jobs_total{outcome="failed"})') == 0
    assert stack.value("sum(spasemsr_queue_wait_seconds_count)") == jobs
    assert stack.value('sum(spasemsr_inference_seconds_count{stage="total"})') == jobs
    # Every job went to the default model's queues and was counted under that model.
    only = f'model="{MODEL}"'
    assert stack.value(f'sum(spasemsr_jobs_total{{outcome="succeeded", {only}}})') == jobs
    assert stack.value(f"sum(spasemsr_queue_wait_seconds_count{{{only}}})") == jobs
    assert stack.value(f"max(max_over_time(spasemsr_queue_depth{{{only}}}[5m]))") >= 2
    other = f'model!="{MODEL}"'
    assert stack.value(f"max(max_over_time(spasemsr_queue_depth{{{other}}}[5m]))") == 0
    # The workers hold only their model: one warm series each, its card in the info series.
    assert stack.value(f"count(spasemsr_model_warm{{{only}}})") == WORKERS
    assert stack.query(f"spasemsr_model_warm{{{other}}}") == []
    cards = stack.query("spasemsr_model_info")
    assert len(cards) == WORKERS
    for card in cards:
        labels = card["metric"]
        assert labels["model"] == MODEL and labels["device"] == "cpu"
        assert {"version", "configuration", "dtype", "trained"} <= set(labels)
    # The backlog queued before the workers started was seen, with its age.
    assert stack.value("max(max_over_time(spasemsr_queue_depth[5m]))") >= 2
    assert stack.value("max(max_over_time(spasemsr_queue_oldest_age_seconds[5m]))") > 1
    assert stack.value("sum(spasemsr_queue_depth)") == 0
    assert stack.value("sum(spasemsr_model_warm)") == WORKERS
    assert stack.value('sum(max by (state) (spasemsr_workers{state=~"idle|busy"}))') == WORKERS
    assert stack.value('sum(up{job="spasemsr-worker"})') == WORKERS
    assert stack.value("min(spasemsr_redis_up)") == 1
    for reason in ("upload_too_large", "unsupported_image", "invalid_parameters"):
        assert stack.value(f'sum(spasemsr_uploads_rejected_total{{reason="{reason}"}})') == 1


def _family(series_name: str) -> str:
    """The name a query uses for a series: histogram and _created suffixes dropped, counters
    with their _total."""
    name = re.sub(r"_(bucket|count|sum|created)$", "", series_name)
    return name if name != "spasemsr_jobs" else "spasemsr_jobs_total"


def test_labels_are_bounded(stack: Stack) -> None:
    series = httpx.get(
        f"{stack.prometheus_url}/api/v1/series",
        params={"match[]": '{__name__=~"spasemsr_.*"}'},
        timeout=10,
    ).json()["data"]
    job_id = re.compile(r"[0-9a-f]{32}")
    for labels in series:
        for name, value in labels.items():
            assert not job_id.search(value), (name, value)
    models = {labels["model"] for labels in series if "model" in labels}
    assert models == {model.value for model in ALL_MODELS}
    # The series with a model label are exactly those the dashboard filters by model.
    with_model = {_family(labels["__name__"]) for labels in series if "model" in labels}
    assert with_model == set(MODEL_LABELLED)
    routes = {labels["route"] for labels in series if "route" in labels}
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/healthz", "/readyz"} <= routes
    assert all(route.startswith("/") or route == "unmatched" for route in routes)


def test_alert_rules_are_loaded_healthy_and_quiet(stack: Stack) -> None:
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]
    rules = [rule for group in groups["groups"] for rule in group["rules"]]
    assert len(rules) == len(_rule_exprs())
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert rule["state"] != "firing", rule
