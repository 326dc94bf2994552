"""Alert rules: `promtool check rules`, and `promtool test rules` proving each alert fires on
the series that should fire it and stays silent otherwise (and that the tests can fail)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, RULE_TESTS, RULES

ALERTS = {
    "SpaSemSRQueueWaitHigh",
    "SpaSemSRQueueOldestJobOld",
    "SpaSemSRQueueStuck",
    "SpaSemSRNoWarmWorker",
    "SpaSemSRModelQueuedWithoutWarmWorker",
    "SpaSemSRModelNotWarm",
    "SpaSemSRJobFailureRatioHigh",
    "SpaSemSRGpuMemoryNearFull",
    "SpaSemSRRedisDown",
    "SpaSemSRApiDown",
    "SpaSemSRHttpServerErrors",
}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rules_pass_promtool_check(promtool: str) -> None:
    checked = _run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout


def test_prometheus_config_passes_promtool_check(promtool: str) -> None:
    checked = _run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "spasemsr.rules.yml" in checked.stdout  # the rule glob finds the rules


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    assert {str(rule["alert"]) for rule in _rules()} == ALERTS
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == ALERTS
    # Silence is proven either by an empty expectation or by a series in the same case that
    # must not appear among the expected alerts (promtool compares the full list).
    assert silent >= ALERTS - {"SpaSemSRGpuMemoryNearFull", "SpaSemSRApiDown"}


def test_rule_unit_tests_pass(promtool: str) -> None:
    tested = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# One wrong threshold or operator per alert, and for the per-model alerts a lost `model`
# split (aggregated over every model, or matched across models): the unit tests must notice
# each one.
MUTANTS = [
    ("SpaSemSRQueueWaitHigh", "> 300", "> 900"),
    ("SpaSemSRQueueWaitHigh", "by (le, queue, model)", "by (le, queue)"),
    ("SpaSemSRQueueOldestJobOld", "> 300", "> 900"),
    ("SpaSemSRQueueOldestJobOld", "max by (queue, model)", "sum by (queue, model)"),
    ("SpaSemSRQueueStuck", "[30m])) > 0)", "[30m])) >= 0)"),
    ("SpaSemSRQueueStuck", "unless on (model)", "unless on ()"),
    ("SpaSemSRNoWarmWorker", "< 1", "< 2"),
    (
        "SpaSemSRModelQueuedWithoutWarmWorker",
        "(spasemsr_model_warm) > 0)",
        "(spasemsr_model_warm) > 1)",
    ),
    ("SpaSemSRModelQueuedWithoutWarmWorker", "unless on (model)", "unless on ()"),
    ("SpaSemSRModelNotWarm", "== 0", "== 1"),
    ("SpaSemSRModelNotWarm", "max by (model)", "min by (model)"),
    ("SpaSemSRJobFailureRatioHigh", "> 0.1", "> 0.7"),
    (
        "SpaSemSRJobFailureRatioHigh",
        "sum by (model) (rate(spasemsr_jobs_total[15m]))",
        "ignoring (model) group_left sum(rate(spasemsr_jobs_total[15m]))",
    ),
    ("SpaSemSRGpuMemoryNearFull", "> 0.92", "> 0.4"),
    ("SpaSemSRRedisDown", "min(spasemsr_redis_up)", "max(spasemsr_redis_up)"),
    ("SpaSemSRApiDown", "== 0", "== 1"),
    ("SpaSemSRHttpServerErrors", '{status=~"5..", route!="/readyz"}', '{status=~"5.."}'),
]


def test_every_alert_has_a_mutant() -> None:
    assert {alert for alert, _, _ in MUTANTS} == ALERTS


@pytest.mark.parametrize(
    ("alert", "old", "new"), MUTANTS, ids=[f"{a}:{new}" for a, _, new in MUTANTS]
)
def test_rule_unit_tests_catch_a_wrong_rule(
    promtool: str, tmp_path: Path, alert: str, old: str, new: str
) -> None:
    document = yaml.safe_load(RULES.read_text())
    rule = next(r for g in document["groups"] for r in g["rules"] if r["alert"] == alert)
    assert rule["expr"].count(old) == 1, rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / RULES.name).write_text(yaml.safe_dump(document))
    (tmp_path / "tests").mkdir()
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    assert _run(promtool, "check", "rules", str(tmp_path / "rules" / RULES.name)).returncode == 0
    tested = _run(promtool, "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name))
    assert tested.returncode != 0, f"the unit tests did not notice the mutant of {alert}"
    assert alert in tested.stdout + tested.stderr
