"""The ``spasemsr`` command as a user runs it: a separate process against live services."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from spasemsr_client import JobStatus, SpaSemSRClient
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import ROOT, ServiceProcesses, free_port, png_bytes


def spasemsr(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command in this process (parsing, output streams and exit code as for a user)."""
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def spasemsr_process(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command as a separate process, exactly as the console script does."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return image.size


def test_help_lists_every_command_and_the_exit_codes() -> None:
    result = spasemsr_process("--help")
    assert result.returncode == 0
    for command in ("serve", "api", "worker", "submit", "status", "cancel", "model", "upscale"):
        assert command in result.stdout
    assert "bench" in result.stdout and "demo" in result.stdout
    assert "Exit codes" in result.stdout
    submit_help = spasemsr("submit", "--help")
    assert "--scale" in submit_help.stdout and "SPASEMSR_URL" in submit_help.stdout


def test_submit_several_files_and_globs_downloads_every_result(
    service: ServiceProcesses, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    (inputs / "more").mkdir(parents=True)
    (inputs / "a.png").write_bytes(png_bytes(20, 16))
    (inputs / "b.png").write_bytes(png_bytes(24, 18))
    (inputs / "more" / "c.png").write_bytes(png_bytes(16, 16))
    (inputs / "notes.txt").write_text("not matched by the glob")
    out = tmp_path / "out"
    result = spasemsr_process(
        "submit", str(inputs / "*.png"), str(inputs / "more"),
        "--url", service.url, "--scale", "2", "--steps", "2", "--out-dir", str(out), "--lines",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "queued" in result.stderr and "succeeded" in result.stderr
    assert _image_size(out / "a.x2.png") == (40, 32)
    assert _image_size(out / "b.x2.png") == (48, 36)
    assert _image_size(out / "c.x2.png") == (32, 32)
    lines = result.stdout.strip().splitlines()
    assert lines == [
        f"{inputs / 'a.png'} -> {out / 'a.x2.png'}",
        f"{inputs / 'b.png'} -> {out / 'b.x2.png'}",
        f"{inputs / 'more' / 'c.png'} -> {out / 'c.x2.png'}",
    ]


def test_submit_json_reports_a_rejected_file_and_exits_4(
    service: ServiceProcesses, tmp_path: Path
) -> None:
    (tmp_path / "good.png").write_bytes(png_bytes())
    (tmp_path / "bad.png").write_bytes(b"plain text, not an image")
    result = spasemsr(
        "submit", str(tmp_path / "good.png"), str(tmp_path / "bad.png"),
        "--url", service.url, "--scale", "2", "--format", "webp", "--json",
        "--out-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 4, result.stderr
    good, bad = (json.loads(line) for line in result.stdout.splitlines())
    assert good["job"]["status"] == "succeeded" and good["exit_code"] == 0
    assert good["output"].endswith("good.x2.webp")
    assert Image.open(good["output"]).format == "WEBP"
    assert bad["job"] is None and bad["exit_code"] == 4
    assert bad["error"]["status"] == 415
    assert bad["error"]["title"] == "Unsupported image format"
    assert "Unsupported image format" in result.stderr


def test_no_wait_status_cancel_and_their_exit_codes(
    idle_service: ServiceProcesses, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    submitted = spasemsr("submit", str(tmp_path / "a.png"), "--url", idle_service.url, "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    try:
        shown = spasemsr("status", job_id, "--url", idle_service.url)
        assert shown.returncode == 0
        assert "queued (next)" in shown.stdout
        as_json = json.loads(spasemsr("status", job_id, "--url", idle_service.url, "--json").stdout)
        assert as_json["id"] == job_id and as_json["queue_position"] == 0
        full = spasemsr(
            "submit", str(tmp_path / "a.png"), "--url", idle_service.url, "--retries", "0"
        )
        assert full.returncode == 5
        assert "Service overloaded" in full.stderr
    finally:
        canceled = spasemsr("cancel", job_id, "--url", idle_service.url)
    assert canceled.returncode == 0
    assert f"{job_id}: canceled" in canceled.stdout
    again = spasemsr("cancel", job_id, "--url", idle_service.url)
    assert again.returncode == 4
    assert "Job already finished" in again.stderr
    waited = spasemsr("status", job_id, "--wait", "--url", idle_service.url)
    assert waited.returncode == 6  # canceled
    unknown = spasemsr("status", "0" * 32, "--url", idle_service.url)
    assert unknown.returncode == 4
    assert "Job not found" in unknown.stderr


def test_wait_timeout_exits_7_and_ctrl_c_cancels_the_unfinished_job(
    idle_service: ServiceProcesses, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    timed_out = spasemsr(
        "submit", str(tmp_path / "a.png"), "--url", idle_service.url, "--wait-timeout", "0.5",
        "--json",
    )  # fmt: skip
    assert timed_out.returncode == 7, timed_out.stderr
    job_id = json.loads(timed_out.stdout)["job"]["id"]
    with SpaSemSRClient(idle_service.url) as client:
        client.cancel(job_id)

    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "submit", str(tmp_path / "a.png"),
         "--url", idle_service.url, "--lines"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    line = process.stderr.readline()  # "a.png: job <id> queued ..."
    assert "queued" in line, line
    job_id = line.split("job ", 1)[1].split()[0]
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 130, rest
    assert "cancel requested" in rest
    with SpaSemSRClient(idle_service.url) as client:
        assert client.get(job_id).status is JobStatus.CANCELED


def test_model_and_unreachable_or_unavailable_services(
    service: ServiceProcesses, idle_service: ServiceProcesses, tmp_path: Path
) -> None:
    shown = spasemsr("model", "--url", service.url)
    assert shown.returncode == 0
    assert "lanczos 1 (classical)" in shown.stdout
    assert "WARNING" not in shown.stderr
    assert json.loads(spasemsr("model", "--url", service.url, "--json").stdout)["trained"] is True
    unavailable = spasemsr("model", "--url", idle_service.url, "--retries", "0")
    assert unavailable.returncode == 3
    assert "No warm worker" in unavailable.stderr
    (tmp_path / "a.png").write_bytes(png_bytes())
    unreachable = spasemsr(
        "submit", str(tmp_path / "a.png"), "--url", f"http://127.0.0.1:{free_port()}"
    )
    assert unreachable.returncode == 3
    assert "cannot reach" in unreachable.stderr
    missing = spasemsr("submit", str(tmp_path / "missing.png"), "--url", service.url)
    assert missing.returncode == 2
    assert "no such file" in missing.stderr
    out_of_bounds = spasemsr("submit", str(tmp_path / "a.png"), "--steps", "500")
    assert out_of_bounds.returncode == 2


def test_bench_reports_latency_and_throughput(service: ServiceProcesses) -> None:
    result = spasemsr("bench", "--url", service.url, "--jobs", "6", "--concurrency", "3", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["outcomes"] == {"succeeded": 6}
    assert figures["throughput_jobs_per_second"] > 0
    for series in ("upload", "queue_wait", "processing", "end_to_end"):
        stats = figures["seconds"][series]
        assert 0 <= stats["p50"] <= stats["p99"] <= stats["max"]


def test_upscale_locally_with_lanczos(tmp_path: Path) -> None:
    (tmp_path / "in.png").write_bytes(png_bytes(20, 12))
    result = spasemsr(
        "upscale", "in.png", "out.jpg", "--model", "lanczos", "--scale", "4", "--lines",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "saved out.jpg (80x48) with lanczos 1 (trained)" in result.stdout
    assert "WARNING" not in result.stderr
    assert "upscale 1/1" in result.stderr  # progress
    with Image.open(tmp_path / "out.jpg") as image:
        assert (image.format, image.size) == ("JPEG", (80, 48))
    gif = spasemsr("upscale", "in.png", "out.gif", "--model", "lanczos", cwd=tmp_path)
    assert gif.returncode == 2
    assert "use .png, .jpg or .webp" in gif.stderr
    (tmp_path / "text.png").write_text("no pixels here")
    broken = spasemsr("upscale", "text.png", "out.png", "--model", "lanczos", cwd=tmp_path)
    assert broken.returncode == 4
    assert "cannot read text.png" in broken.stderr
    assert spasemsr("upscale", "nope.png", "out.png", cwd=tmp_path).returncode == 2
    unknown = spasemsr("upscale", "in.png", "out.png", "--model", "bilinear", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "realesrgan-x4plus" in unknown.stderr  # the choices are the service's model names


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("model.upscalers.spasemsr") is None,
    reason="model/upscalers/spasemsr.py not present",
)
def test_upscale_locally_with_the_tiny_spasemsr_pipeline(tmp_path: Path) -> None:
    """Builds the tiny untrained demo pipeline under ``tmp_path/var`` first (tens of seconds)."""
    (tmp_path / "in.png").write_bytes(png_bytes(16, 16))
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "upscale", "in.png", "out.png",
         "--model", "spasemsr", "--steps", "2", "--scale", "2", "--device", "cpu", "--lines"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), "SPASEMSR_VAR_DIR": "var"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "denoise 2/2" in result.stderr
    assert _image_size(tmp_path / "out.png") == (32, 32)
    assert "with spasemsr" in result.stdout and "(UNTRAINED)" in result.stdout
    assert "WARNING: The spasemsr weights are untrained" in result.stderr


def test_submit_to_an_exact_output_path(service: ServiceProcesses, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(10, 10))
    target = tmp_path / "deep" / "result.png"
    saved = spasemsr("submit", str(tmp_path / "a.png"), "-o", str(target), "--url", service.url)
    assert saved.returncode == 0, saved.stderr
    assert _image_size(target) == (40, 40)  # the service's default scale is 4
    two = spasemsr("submit", str(tmp_path / "a.png"), str(target), "-o", "x.png")
    assert two.returncode == 2
    assert "--output takes exactly one input" in two.stderr


def test_submit_saves_results_beside_their_inputs_unless_out_names_a_folder(
    service: ServiceProcesses, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    (photos / "a.png").write_bytes(png_bytes(10, 8))
    (photos / "more" / "b.png").write_bytes(png_bytes(12, 6))
    elsewhere = tmp_path / "elsewhere"  # the folder the command runs in gets nothing
    elsewhere.mkdir()
    beside = spasemsr(
        "submit", str(photos / "a.png"), str(photos / "more"), "--scale", "2",
        "--url", service.url, "--lines", cwd=elsewhere,
    )  # fmt: skip
    assert beside.returncode == 0, beside.stderr
    assert _image_size(photos / "a.x2.png") == (20, 16)
    assert _image_size(photos / "more" / "b.x2.png") == (24, 12)
    assert list(elsewhere.iterdir()) == []
    assert beside.stdout.splitlines() == [
        f"{photos / 'a.png'} -> {photos / 'a.x2.png'}",
        f"{photos / 'more' / 'b.png'} -> {photos / 'more' / 'b.x2.png'}",
    ]
    # --out DIR (as the README writes it) and the older --out-dir / -d spellings.
    for flag in ("--out", "--out-dir", "-d"):
        chosen = tmp_path / f"results{flag}"
        result = spasemsr(
            "submit", str(photos / "a.png"), flag, str(chosen), "--scale", "2",
            "--url", service.url, "--lines",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert _image_size(chosen / "a.x2.png") == (20, 16)


def test_submit_reports_results_it_cannot_save_without_a_traceback(
    service: ServiceProcesses, idle_service: ServiceProcesses, tmp_path: Path
) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(10, 8))
    # A folder that cannot be made: a usage error before anything is submitted.
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("a file where the result folder should be")
    result = spasemsr(
        "submit", str(tmp_path / "a.png"), "--out", str(blocked), "--url", idle_service.url,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"cannot create the folder {blocked}" in result.stderr
    # A result that cannot be written (a folder stands where the file should go): that file
    # fails (exit 1), reported on its line.
    taken = tmp_path / "taken.png"
    taken.mkdir()
    result = spasemsr(
        "submit", str(tmp_path / "a.png"), "-o", str(taken), "--url", service.url, "--lines",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"a.png: error: cannot save the result as {taken}" in result.stderr


def test_cancel_of_an_ended_job_says_how_it_ended(
    service: ServiceProcesses, idle_service: ServiceProcesses, tmp_path: Path
) -> None:
    """The 409 of a cancel reads ``Job <id> has already succeeded.`` (not ``is already``)."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    done = spasemsr(
        "submit", str(tmp_path / "a.png"), "--url", service.url, "--no-download", "--json"
    )
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job"]["id"]
    succeeded = spasemsr("cancel", job_id, "--url", service.url)
    assert succeeded.returncode == 4
    assert f"Job {job_id} has already succeeded." in succeeded.stderr
    assert "is already" not in succeeded.stderr

    queued = spasemsr("submit", str(tmp_path / "a.png"), "--url", idle_service.url, "--no-wait")
    assert queued.returncode == 0, queued.stderr
    queued_id = queued.stdout.strip()
    assert spasemsr("cancel", queued_id, "--url", idle_service.url).returncode == 0
    canceled = spasemsr("cancel", queued_id, "--url", idle_service.url)
    assert canceled.returncode == 4
    assert f"Job {queued_id} has already been canceled." in canceled.stderr
