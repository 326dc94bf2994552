"""Models in the CLI: ``--model``, ``spasemsr models``, model names and untrained warnings.

The live service holds Lanczos only (default ``lanczos``); untrained models are checked with
``Job`` objects whose ``model_trained`` is false, and the local ``upscale`` routing with a
stand-in loader (the Real-ESRGAN and SpaSemSR weights are not needed for that).
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rich.console import Console
from spasemsr_client.models import Job, ModelDescription, ModelList

from cli.display import LineReporter, Tracked, job_warnings, model_text
from cli.remote import job_lines, model_rows, model_warnings
from core.models import ModelName
from core.settings import Settings
from model.upscalers.lanczos import LanczosUpscaler
from tests.cli.test_cli import spasemsr
from tests.conftest import ServiceProcesses, png_bytes

UNTRAINED = (
    "The spasemsr weights are untrained (seeded random initialisation): results show the "
    "pipeline working, not the model's quality."
)


def _job(**fields: Any) -> Job:
    return Job.model_validate(
        {
            "id": "a" * 32,
            "status": "queued",
            "priority": "default",
            "queue_position": 0,
            "created_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
            "input": {"width": 8, "height": 8, "format": "png", "bytes": 10},
            "links": {"self": "/v1/jobs/a", "result": "/v1/jobs/a/result"},
            **fields,
        }
    )


# --- against the live service --------------------------------------------------------------


def test_submit_with_model_names_the_model(service: ServiceProcesses, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(12, 10))
    result = spasemsr(
        "submit", str(tmp_path / "a.png"), "--model", "lanczos", "--scale", "2",
        "--url", service.url, "--out-dir", str(tmp_path / "out"), "--lines",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[lanczos, trained] queued" in result.stderr
    assert "[lanczos, trained] succeeded" in result.stderr
    assert "WARNING" not in result.stderr
    with Image.open(tmp_path / "out" / "a.x2.png") as image:
        assert image.size == (24, 20)
    as_json = spasemsr(
        "submit", str(tmp_path / "a.png"), "-m", "lanczos", "--url", service.url, "--json",
        "--out-dir", str(tmp_path / "out2"),
    )  # fmt: skip
    job = json.loads(as_json.stdout)["job"]
    assert (job["model"], job["model_trained"], job["warnings"]) == ("lanczos", True, [])
    shown = spasemsr("status", job["id"], "--url", service.url)
    assert shown.returncode == 0
    assert any(
        line.split() == ["model", "lanczos,", "trained"] for line in shown.stdout.splitlines()
    ), shown.stdout


def test_submit_of_an_unserved_model_is_rejected_naming_the_served_ones(
    service: ServiceProcesses, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    result = spasemsr(
        "submit", str(tmp_path / "a.png"), "--model", "spasemsr", "--url", service.url, "--json"
    )
    assert result.returncode == 4, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "ModelNotServed"
    assert error["status"] == 422 and error["served"] == ["lanczos"]
    assert "Model not served" in result.stderr
    bad_name = spasemsr("submit", str(tmp_path / "a.png"), "--model", "bilinear")
    assert bad_name.returncode == 2


def test_models_table_and_json(service: ServiceProcesses) -> None:
    result = spasemsr("models", "--url", service.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.strip().startswith("name"))
    assert header.split() == [
        "name", "trained", "source", "licence", "scales", "device", "workers", "default",
    ]  # fmt: skip
    row = next(line for line in lines if line.strip().startswith("lanczos"))
    assert row.split()[:2] == ["lanczos", "yes"]
    assert "x2, x4" in row and "cpu" in row and row.split()[-2:] == ["1", "yes"]
    assert "WARNING" not in result.stderr
    listed = json.loads(spasemsr("models", "--url", service.url, "--json").stdout)
    assert listed["default"] == "lanczos"
    assert [m["name"] for m in listed["models"]] == ["lanczos"]


def test_models_without_a_warm_worker(idle_service: ServiceProcesses) -> None:
    result = spasemsr("models", "--url", idle_service.url)
    assert result.returncode == 3
    assert "no warm worker" in result.stderr
    assert "default model lanczos" in result.stderr


def test_demo_says_which_model_ran_and_whether_trained(
    service: ServiceProcesses, tmp_path: Path
) -> None:
    out = tmp_path / "demo.png"
    result = spasemsr(
        "demo", "--url", service.url, "--out", str(out), "--model", "lanczos", "--scale", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "queued for model lanczos, trained" in result.stdout
    assert "model: lanczos, trained" in result.stdout
    assert f"saved {out}" in result.stdout
    assert "WARNING" not in result.stderr
    unnamed = spasemsr("demo", "--url", service.url, "--out", str(out), "--scale", "2")
    assert "model: lanczos, trained" in unnamed.stdout  # the service's default


# --- untrained models, as units ------------------------------------------------------------


def test_untrained_job_is_named_and_warned_once() -> None:
    untrained = _job(model="spasemsr", model_trained=False, warnings=[UNTRAINED])
    assert model_text(untrained) == "spasemsr, UNTRAINED"
    assert model_text(_job(model="lanczos", model_trained=True)) == "lanczos, trained"
    assert model_text(_job(model="lanczos")) == "lanczos, trained: unknown"

    buffer = io.StringIO()
    reporter = LineReporter(Console(file=buffer, width=300))
    first, second = Tracked(Path("a.png"), job=untrained), Tracked(Path("b.png"), job=untrained)
    for item in (first, second, first):
        reporter.update(item)
    second.job = _job(
        model="spasemsr", model_trained=False, warnings=[UNTRAINED], status="processing"
    )
    reporter.update(second)
    text = buffer.getvalue()
    assert f"a.png: job {'a' * 32} [spasemsr, UNTRAINED] queued (next)" in text
    assert text.count(f"WARNING: {UNTRAINED}") == 1  # once per run, not per job or update

    quiet = io.StringIO()
    LineReporter(Console(file=quiet, width=300)).update(
        Tracked(Path("c.png"), job=_job(model="lanczos", model_trained=True))
    )
    assert "WARNING" not in quiet.getvalue()


def test_untrained_job_without_service_warnings_still_gets_one() -> None:
    bare = _job(model="spasemsr", model_trained=False)
    (warning,) = job_warnings(bare)
    assert "spasemsr" in warning and "untrained" in warning
    assert job_warnings(_job(model="lanczos", model_trained=True)) == []
    assert job_warnings(_job(model="lanczos")) == []  # unknown is not untrained
    grounding = "The grounding (tags, boxes) came from untrained models."
    both = _job(model="spasemsr", model_trained=False, warnings=[UNTRAINED, grounding])
    assert job_warnings(both) == [UNTRAINED, grounding]
    rows = dict(job_lines(bare))
    assert rows["model"] == "spasemsr, UNTRAINED"
    assert "untrained" in rows["warning"]


def test_models_table_rows_mark_untrained_models() -> None:
    def described(name: str, *, trained: bool, **extra: Any) -> ModelDescription:
        return ModelDescription(
            name=name, version="1", configuration="c", weights="w", trained=trained,
            device="cuda:0", dtype="float16", **extra,
        )  # fmt: skip

    catalogue = ModelList(
        default="realesrgan-x4plus",
        models=[
            described("spasemsr", trained=False, workers=1, devices=["cuda:0", "cuda:1"]),
            described(
                "realesrgan-x4plus", trained=True, source="xinntao/Real-ESRGAN",
                licence="BSD-3-Clause", scales=[4], workers=2, default=True,
            ),
        ],
    )  # fmt: skip
    untrained, trained = model_rows(catalogue)
    assert untrained == (
        "spasemsr", "NO (untrained)", "-", "-", "x2, x4", "cuda:0, cuda:1", "1", "",
    )  # fmt: skip
    assert trained == (
        "realesrgan-x4plus", "yes", "xinntao/Real-ESRGAN", "BSD-3-Clause", "x4", "cuda:0", "2",
        "yes",
    )  # fmt: skip
    assert "untrained" in model_warnings(catalogue.models[0])[0]
    assert model_warnings(catalogue.models[1]) == []


# --- local upscale: every model name goes through the worker's loader ----------------------


@pytest.mark.parametrize("name", list(ModelName))
def test_upscale_locally_loads_the_named_model(
    name: ModelName, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.engine

    loaded: list[ModelName] = []

    def fake_load(settings: Settings, model: ModelName) -> LanczosUpscaler:
        assert isinstance(settings, Settings)
        loaded.append(model)
        return LanczosUpscaler()

    monkeypatch.setattr(worker.engine, "load_upscaler", fake_load)
    (tmp_path / "in.png").write_bytes(png_bytes(10, 6))
    result = spasemsr(
        "upscale", "in.png", "out.png", "--model", name.value, "--scale", "2", "--lines",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert loaded == [name]
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (20, 12)


def test_upscale_locally_defaults_to_the_configured_default_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.engine

    loaded: list[ModelName] = []

    def fake_load(settings: Settings, model: ModelName) -> LanczosUpscaler:
        loaded.append(model)
        return LanczosUpscaler()

    monkeypatch.setattr(worker.engine, "load_upscaler", fake_load)
    monkeypatch.setenv("SPASEMSR_MODEL__DEFAULT", "realesr-animevideov3")
    (tmp_path / "in.png").write_bytes(png_bytes(8, 8))
    assert spasemsr("upscale", "in.png", "a.png", cwd=tmp_path).returncode == 0
    monkeypatch.delenv("SPASEMSR_MODEL__DEFAULT")
    assert spasemsr("upscale", "in.png", "b.png", cwd=tmp_path).returncode == 0
    monkeypatch.setenv("SPASEMSR_MODEL__PATH", str(tmp_path))  # a pipeline folder: spasemsr
    assert spasemsr("upscale", "in.png", "c.png", cwd=tmp_path).returncode == 0
    assert loaded == [
        ModelName.REALESR_ANIMEVIDEOV3,
        ModelName.REALESRGAN_X4PLUS,
        ModelName.SPASEMSR,
    ]


def test_upscale_locally_warns_about_untrained_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    import worker.engine

    class Untrained(LanczosUpscaler):
        @property
        def card(self) -> Any:
            return dataclasses.replace(
                super().card, name="spasemsr", trained=False, weights="seeded random"
            )

    monkeypatch.setattr(worker.engine, "load_upscaler", lambda s, m: Untrained())
    (tmp_path / "in.png").write_bytes(png_bytes(8, 8))
    result = spasemsr("upscale", "in.png", "out.png", "--model", "spasemsr", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "with spasemsr" in result.stdout and "(UNTRAINED)" in result.stdout
    assert "WARNING: The spasemsr weights are untrained (seeded random)" in result.stderr
