"""`spasemsr train` takes its options from TrainingConfig: one per documented field, with the
field's default and bounds, so a new hyper-parameter is on the command line at once."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer
from typer.testing import CliRunner

from cli.main import app
from model.training.config import TrainingConfig


def _train_options() -> dict[str, Any]:
    commands: dict[str, Any] = getattr(typer.main.get_command(app), "commands")  # noqa: B009
    return {param.name: param for param in commands["train"].params if param.name}


def test_every_documented_field_is_an_option_with_its_default() -> None:
    options = _train_options()
    for spec in dataclasses.fields(TrainingConfig):
        if "help" not in spec.metadata:
            continue
        assert spec.name in options, spec.name
        assert options[spec.name].default == spec.default, spec.name
    assert "--accumulation" in options["gradient_accumulation_steps"].opts


def test_the_fields_bounds_are_the_options_bounds() -> None:
    result = CliRunner().invoke(app, ["train", ".", "--max-steps", "0"])
    assert result.exit_code == 2
    assert "max-steps" in result.output
