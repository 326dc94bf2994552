"""What ``spasemsr COMMAND --help`` says agrees with what the command does."""

from __future__ import annotations

import re

import typer
import typer.core

from cli.main import app
from tests.cli.test_cli import spasemsr

# "(default 4)", "(default: random)", "(default png)" in an option's own help text.
STATED_DEFAULT = re.compile(r"\(default:? ([^),;]+)")


def _options() -> list[tuple[str, typer.core.TyperOption]]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return [
        (name, parameter)
        for name, command in group.commands.items()
        for parameter in command.params
        if isinstance(parameter, typer.core.TyperOption)
    ]


def test_an_option_that_states_its_default_has_that_default() -> None:
    """A help text that names a default must not sit beside typer's own, different
    ``[default: ...]`` (as ``bench --scale`` once said "(default 4). [default: 2]")."""
    wrong = []
    for command, option in _options():
        stated = STATED_DEFAULT.search(option.help or "")
        if stated is None or option.default is None:
            continue  # the default is the service's or the model's, and the text says which
        actual = option.default.value if hasattr(option.default, "value") else option.default
        if stated.group(1).strip() != str(actual):
            wrong.append(f"{command} {option.opts[0]}: says {stated.group(1)!r}, is {actual!r}")
    assert wrong == []


def _help(command: str) -> str:
    """The help text as words, without the boxes and line breaks of its layout."""
    shown = spasemsr(command, "--help")
    assert shown.returncode == 0
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", shown.stdout).split())


def test_bench_help_gives_one_default_scale() -> None:
    text = _help("bench")
    assert "[default: 2]" in text
    assert "(default 4)" not in text


def test_submit_help_says_where_results_go() -> None:
    text = _help("submit")
    assert "--out" in text and "(default: beside each input)" in text
