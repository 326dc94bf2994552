"""The job contract is written once (core.jobs). Packages that must not import core (the
client: httpx and pydantic only; the model package: no service code) keep their own copies;
these tests keep those copies equal to it, so that adding a scheduler fails here until every
copy knows it."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_type_hints

import spasemsr_client._common as client_common
import spasemsr_client.models as client_models

import core.jobs as contract
from app.schemas import JobCreate
from core.models import ModelName
from model.pipeline import color
from model.pipeline import diffusion as pipeline
from model.upscalers import base as model_upscaler


def test_the_clients_choices_are_the_contracts() -> None:
    assert get_args(client_models.ColorFix) == contract.COLOR_FIXES
    assert get_args(client_models.SchedulerName) == contract.SCHEDULERS
    assert get_args(client_models.ImageFormat) == tuple(f.value for f in contract.ImageFormat)
    assert get_args(client_models.Priority) == tuple(p.value for p in contract.Priority)
    assert tuple(m.value for m in ModelName) == client_models.MODEL_NAMES


def test_the_clients_job_options_are_the_forms_fields() -> None:
    options = set(get_type_hints(client_common.JobOptions))
    form = set(JobCreate.model_fields) - {"model", "webhook_url"} | {"webhook"}
    assert options == form
    every_option = {"webhook": "https://example.org/hook", "scale": 2, "tags": ["a", "b"]}
    sent = client_common.form_fields(every_option)  # type: ignore[arg-type]
    assert set(sent) <= set(JobCreate.model_fields)  # the API refuses unknown fields
    assert sent["webhook_url"] == "https://example.org/hook"


def test_the_models_options_default_as_the_contract() -> None:
    defaults: dict[str, Any] = {
        f.name: f.default for f in dataclasses.fields(model_upscaler.UpscaleOptions)
    }
    for name in ("scale", "steps", "guidance_scale", "seed", "color_fix", "scheduler",
                 "tile_size"):  # fmt: skip
        assert defaults[name] == contract.parameter_default(name), name
    assert get_args(model_upscaler.ColorFix) == contract.COLOR_FIXES
    assert get_args(model_upscaler.SchedulerName) == contract.SCHEDULERS


def test_the_pipeline_runs_every_choice_the_contract_offers() -> None:
    assert set(pipeline.SCHEDULERS) == set(contract.SCHEDULERS)
    assert set(color.COLOR_FIX_MODES) == set(contract.COLOR_FIXES)


def test_the_form_takes_the_contracts_bounds_and_defaults() -> None:
    form = JobCreate.model_json_schema()["properties"]
    for name in ("steps", "guidance_scale", "tile_size"):
        bounds = contract.parameter_bounds(name)
        assert (form[name]["minimum"], form[name]["maximum"]) == (bounds.minimum, bounds.maximum)
        assert form[name]["default"] == contract.parameter_default(name)
    assert form["scale"]["enum"] == list(contract.SCALES)
