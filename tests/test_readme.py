"""The README and docs agree with the code: every ``spasemsr`` command they show exists with the
flags they give it, every file they name is in the repository, and nothing points outside it."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import typer
import typer.core

from cli.main import app
from tests.conftest import ROOT

README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"
DOCKERFILE = ROOT / "Dockerfile"
# The README's sections that show how to use the command (those with `spasemsr ...` in them).
USAGE_SECTIONS = ("Using it", "Models, training and evaluation", "Running on a GPU")
# Spelled in two halves so that this file does not itself contain what it looks for.
OUTSIDE_REFERENCES = ("../" + "shared", "shared/" + "DESIGN.md")
FENCE = re.compile(r"^([ \t]*)```[^\n]*\n.*?^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"^\[?(--?[A-Za-z][\w-]*\*?)")
# Inline code that names a file of the repository: a path under a top-level package, or a file
# at the top (`Dockerfile` aside: the README names it as a word, not as a path).
REPOSITORY_PATH = r"(?:app|bench|cli|client|core|deploy|docs|model|tests|worker)/\S+"
REPOSITORY_FILE = r"[\w.-]+\.(?:md|py|toml|txt|yml)"
DESIGN_CITATION = re.compile(r"DESIGN (\d+\.\d+[a-z]?)(?:-(\d+\.\d+))?")


@dataclass(frozen=True)
class Shown:
    """A command line as the README shows it: ``spasemsr submit a.png --scale 4``."""

    text: str
    words: tuple[str, ...]

    @property
    def subcommand(self) -> str:
        return self.words[0]

    @property
    def flags(self) -> list[str]:
        return [m.group(1) for word in self.words[1:] if (m := FLAG.match(word))]


def _sections(markdown: str) -> dict[str, str]:
    """Each ``## `` section's text (its ``###`` subsections included), by title."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _code_lines(section: str) -> tuple[list[str], str]:
    """Lines of fenced and indented code blocks, and the prose left around them."""
    lines: list[str] = []
    for block in FENCE.finditer(section):
        lines += block.group(0).splitlines()[1:-1]
    prose = FENCE.sub("", section)
    kept: list[str] = []
    for line in prose.splitlines():
        # A four-space block after a blank line; list continuations are indented by two.
        if line.startswith("    ") and not line.lstrip().startswith(("-", "*")):
            lines.append(line)
        else:
            kept.append(line)
    return lines, "\n".join(kept)


def _is_program(word: str) -> bool:
    """``spasemsr``, ``.venv/bin/spasemsr`` or ``cli.main`` (``python -m cli.main``)."""
    return word in {"spasemsr", "cli.main"} or word.endswith("/spasemsr")


def _command_in(text: str, *, inline: bool = False) -> Shown | None:
    """The ``spasemsr`` command a code line or code span shows. A code span must start with it
    (after ``VAR=value`` assignments): ``spasemsr`` alone there is the model's name."""
    words = text.split(" #", 1)[0].split()
    start = next((i for i, word in enumerate(words) if _is_program(word)), None)
    if start is None:
        return None
    if inline and not all(re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", word) for word in words[:start]):
        return None
    rest = words[start + 1 :]
    if not rest or not re.fullmatch(r"[a-z][a-z-]*", rest[0]):
        return None  # no subcommand: a placeholder such as COMMAND, or the model's name
    return Shown(text=" ".join(words), words=tuple(rest))


@cache
def _usage() -> tuple[list[Shown], list[str]]:
    """Every command shown in the usage sections, and the flags named on their own there."""
    sections = _sections(README.read_text())
    missing = [title for title in USAGE_SECTIONS if title not in sections]
    assert missing == [], f"README has no section {missing}"
    commands: list[Shown] = []
    lone_flags: list[str] = []
    for title in USAGE_SECTIONS:
        code, prose = _code_lines(sections[title])
        commands += [shown for line in code if (shown := _command_in(line))]
        for span in INLINE_CODE.findall(prose):
            span = " ".join(span.split())  # a code span may run over a line break
            if shown := _command_in(span, inline=True):
                commands.append(shown)
            elif match := FLAG.match(span):
                lone_flags.append(match.group(1))
    return commands, lone_flags


def _flags_of(command: typer.core.TyperCommand) -> set[str]:
    """Every spelling of every option, ``-h``/``--help`` included (set once for the app)."""
    context_settings = app.info.context_settings
    assert context_settings is not None
    flags = set(context_settings.get("help_option_names", ["--help"]))
    for parameter in command.params:
        if isinstance(parameter, typer.core.TyperOption):
            flags.update(parameter.opts + parameter.secondary_opts)
    return flags


@cache
def _commands() -> dict[str, typer.core.TyperCommand]:
    """The subcommands as the console script builds them (typer's command objects)."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return {
        name: command
        for name, command in group.commands.items()
        if isinstance(command, typer.core.TyperCommand)
    }


def _has(flags: set[str], flag: str) -> bool:
    return any(fnmatch.fnmatchcase(known, flag) for known in flags)


def test_the_readme_shows_the_commands_a_user_needs() -> None:
    commands, _ = _usage()
    shown = {command.subcommand for command in commands}
    expected = {"submit", "status", "cancel", "models", "upscale", "bench", "weights", "train"}
    assert expected <= shown, expected - shown


def test_every_command_in_the_readme_exists_with_the_flags_it_is_shown_with() -> None:
    commands, _ = _usage()
    wrong: list[str] = []
    for shown in commands:
        command = _commands().get(shown.subcommand)
        if command is None:
            wrong.append(f"{shown.text}: no command {shown.subcommand!r}")
            continue
        flags = _flags_of(command)
        wrong += [
            f"{shown.text}: no option {flag}" for flag in shown.flags if not _has(flags, flag)
        ]
    assert wrong == []


def test_every_flag_the_readme_names_on_its_own_belongs_to_a_command() -> None:
    _, lone_flags = _usage()
    assert "--out" in lone_flags  # the submit folder option is described in prose
    every = set().union(*(_flags_of(command) for command in _commands().values()))
    assert [flag for flag in lone_flags if not _has(every, flag)] == []


def test_submit_takes_the_out_folder_the_readme_promises() -> None:
    flags = _flags_of(_commands()["submit"])
    assert {"--out", "--out-dir", "-d", "--output", "-o"} <= flags


def _tracked_text_files() -> list[Path]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(
        [git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    files = [ROOT / name.decode() for name in listed if name]
    return [path for path in files if path.is_file() and b"\0" not in path.read_bytes()[:8192]]


def _documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def test_no_file_points_outside_the_repository() -> None:
    candidates = {*_tracked_text_files(), *_documents()}  # docs/ may not be committed yet
    offending = [
        f"{path.relative_to(ROOT)}: {needle}"
        for path in sorted(candidates)
        for needle in OUTSIDE_REFERENCES
        if needle in path.read_text(errors="replace")
    ]
    assert offending == []


def _named_file_exists(name: str) -> bool:
    """A bare file name (``make_env.py``) names a file somewhere in the repository's own
    folders (not the virtual environment, caches or run-time data)."""
    if "/" in name:
        return False
    skipped = {".git", ".venv", "var", "node_modules"}
    return any(not skipped & set(path.relative_to(ROOT).parts) for path in ROOT.rglob(name))


def test_files_named_in_the_readme_and_docs_are_in_the_repository() -> None:
    missing: list[str] = []
    for document in _documents():
        text = FENCE.sub("", document.read_text())  # a fence's backticks are no code span
        links = re.findall(r"\]\(([^)#\s]+)[^)]*\)", text)
        named = [
            span
            for span in INLINE_CODE.findall(text)
            if re.fullmatch(REPOSITORY_PATH, span) or re.fullmatch(REPOSITORY_FILE, span)
        ]
        for target in links + named:
            if re.match(r"[a-z]+:", target):  # a URL, not a file
                continue
            path = (document.parent if target in links else ROOT) / target
            inside = path.resolve().is_relative_to(ROOT)
            if not inside or not (path.exists() or _named_file_exists(target)):
                missing.append(f"{document.relative_to(ROOT)}: {target}")
    assert missing == []


def test_design_sections_cited_in_the_code_exist_in_docs() -> None:
    headings = set(re.findall(r"^#{2,4} (\d+\.\d+[a-z]?) ", DESIGN.read_text(), re.MULTILINE))
    cited: dict[str, str] = {}
    for path in _tracked_text_files():
        for match in DESIGN_CITATION.finditer(path.read_text(errors="replace")):
            for section in filter(None, match.groups()):
                cited.setdefault(section, str(path.relative_to(ROOT)))
    assert cited, "no code cites docs/design.md"
    assert {s: where for s, where in cited.items() if s not in headings} == {}


def test_the_gpu_section_names_the_worker_image_the_dockerfile_builds() -> None:
    """Base image, torch release and wheel index, as the Dockerfile's build arguments say."""
    arguments = dict(
        re.findall(
            r"^ARG (CUDA_IMAGE|TORCH_VERSION|TORCH_INDEX)=(\S+)$", DOCKERFILE.read_text(), re.M
        )
    )
    assert set(arguments) == {"CUDA_IMAGE", "TORCH_VERSION", "TORCH_INDEX"}
    section = _sections(README.read_text())["Running on a GPU"]
    assert [value for value in arguments.values() if value not in section] == []
    assert f"torch=={arguments['TORCH_VERSION']}" in section
