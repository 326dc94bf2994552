"""The web page end to end in headless Chromium against a live service (Lanczos workers).

Screenshots go to ``var/test-artifacts/web/``.
"""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageChops, ImageStat
from playwright.sync_api import expect
from redis import Redis

from core.models import ModelName
from core.workers import ModelInfo, WorkerInfo, WorkerRegistry, WorkerState
from tests.conftest import ServiceProcesses, png_bytes

# Records every text the job status cells show, so that fleeting states are not missed.
RECORD_STATUSES = """
window.__statuses = {};
new MutationObserver(() => {
  for (const job of document.querySelectorAll('.job')) {
    const name = job.querySelector('.job-name').textContent;
    const text = job.querySelector('.job-status').textContent;
    const seen = (window.__statuses[name] = window.__statuses[name] || []);
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


# The "before" image as the page shows it, read back through a canvas as a PNG data URL.
READ_BEFORE = """
img => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  canvas.getContext('2d').drawImage(img, 0, 0);
  return canvas.toDataURL('image/png');
}
"""


def _only_this_origin(urls: list[str], origin: str) -> None:
    foreign = [u for u in urls if not u.startswith((origin + "/", "blob:", "data:"))]
    assert foreign == [], foreign


def _picker(page: Any) -> list[tuple[str, str]]:
    """(value, label) of every option of the model picker."""
    return [
        (option["value"], option["label"])
        for option in page.eval_on_selector_all(
            "#model option", "os => os.map(o => ({value: o.value, label: o.textContent}))"
        )
    ]


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def test_upload_watch_progress_compare_and_download(
    page: Any, requested: list[str], web_service: Any, artifacts: Path
) -> None:
    page.add_init_script(RECORD_STATUSES)
    page.goto(web_service.url + "/")
    expect(page.locator("#model-name")).to_have_text("lanczos 1")
    assert page.locator("#model-warning").is_hidden()  # Lanczos has nothing to train
    # The picker lists what GET /v1/models says, labelled trained/untrained, default chosen.
    assert _picker(page) == [("lanczos", "lanczos — trained (default)")]
    assert page.eval_on_selector("#model", "s => s.value") == "lanczos"
    assert page.locator("label[for='model']").inner_text() == "Model"
    assert "trained" in page.inner_text("#model-details")
    page.screenshot(path=str(artifacts / "01-form.png"), full_page=True)

    page.set_input_files(
        "#files",
        [
            {"name": "first.png", "mimeType": "image/png", "buffer": png_bytes(24, 16)},
            {"name": "second.png", "mimeType": "image/png", "buffer": png_bytes(40, 30)},
        ],
    )
    assert "2 files" in page.inner_text("#file-list")
    page.select_option("#scale", "2")
    page.fill("#seed", "7")
    page.click("#submit")
    # (jobs of earlier tests on this service are listed too: GET /v1/jobs on load)
    for name in ("first.png", "second.png"):
        expect(page.locator(".job", has_text=name)).to_have_attribute("data-status", "succeeded")
    page.wait_for_selector("#viewer:not([hidden])")
    # (string predicates would need 'unsafe-eval', which the page's CSP rightly refuses)
    expect(page.locator("#after-image")).to_have_js_property("complete", True)
    page.screenshot(path=str(artifacts / "02-jobs-done.png"), full_page=True)

    recorded = page.evaluate("window.__statuses")
    for statuses in (recorded["first.png"], recorded["second.png"]):
        assert statuses[0] == "uploading"
        assert any(s.startswith("queued") for s in statuses), statuses
        assert statuses[-1] == "succeeded"
    ours = page.locator(".job:not([data-restored])")
    assert ours.locator(".job-progress").first.evaluate("bar => bar.value") == 1
    # Each job names its model and whether it is trained; Lanczos brings no warnings.
    assert ours.locator(".job-model").all_inner_texts() == ["Model: lanczos (trained)"] * 2
    assert ours.locator(".job-warnings").first.is_hidden()
    assert "lanczos (trained)" in page.inner_text("#viewer-caption")
    assert page.inner_text("#tag-after") == "After (lanczos)"
    assert "bicubic" in page.inner_text("#viewer-note").lower()

    # The slider shows the result at full resolution: one image pixel per CSS pixel at 100%.
    name = page.inner_text("#viewer-name")
    source = {"first.png": (24, 16), "second.png": (40, 30)}[name]
    natural = page.eval_on_selector("#after-image", "i => [i.naturalWidth, i.naturalHeight]")
    assert natural == [source[0] * 2, source[1] * 2]
    box = page.locator("#compare").bounding_box()
    assert (round(box["width"]), round(box["height"])) == (source[0] * 2, source[1] * 2)

    # "Before" is the input enlarged to the result's size by a bicubic resampling: far closer
    # to PIL's bicubic enlargement than to nearest-neighbour blocks, and never pixelated.
    expect(page.locator("#before-image")).to_have_js_property("complete", True)
    assert page.get_attribute("#before-image", "data-method") == "bicubic"
    assert page.eval_on_selector("#before-image", "i => i.src").startswith("blob:")
    shown = page.eval_on_selector("#before-image", READ_BEFORE)
    before = Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))).convert("RGB")
    assert before.size == (source[0] * 2, source[1] * 2)
    original = Image.open(io.BytesIO(png_bytes(*source))).convert("RGB")
    bicubic = original.resize(before.size, Image.Resampling.BICUBIC)
    nearest = original.resize(before.size, Image.Resampling.NEAREST)
    to_bicubic, to_nearest = _mean_difference(before, bicubic), _mean_difference(before, nearest)
    assert to_bicubic < to_nearest / 2, (to_bicubic, to_nearest)
    rendering = page.eval_on_selector("#before-image", "i => getComputedStyle(i).imageRendering")
    assert rendering == "auto"

    # Keyboard: the divider moves with the arrow keys, zoom with '+'.
    page.focus("#compare-position")
    for _ in range(10):
        page.keyboard.press("ArrowLeft")
    assert page.eval_on_selector("#compare-position", "e => e.value") == "40"
    clip = page.eval_on_selector("#before-image", "e => e.style.clipPath")
    assert clip.replace("px", "") == "inset(0 60% 0 0)"
    page.focus("#viewport")
    for _ in range(3):
        page.keyboard.press("+")
    assert page.inner_text("#zoom-value") == "800%"
    box = page.locator("#compare").bounding_box()
    assert round(box["width"]) == source[0] * 2 * 8
    page.screenshot(path=str(artifacts / "03-compare-zoomed.png"), full_page=True)

    with page.expect_download() as info:
        page.click("#viewer-download")
    download = info.value
    assert download.suggested_filename == f"{Path(name).stem}.x2.png"
    saved = Path(download.path()).read_bytes()
    job_id = page.locator(".job", has_text=name).get_attribute("data-job-id")
    served = httpx.get(f"{web_service.url}/v1/jobs/{job_id}/result").content
    assert saved == served
    assert Image.open(io.BytesIO(saved)).size == (source[0] * 2, source[1] * 2)
    _only_this_origin(requested, web_service.url)


def test_rejected_uploads_show_the_problem_titles(
    page: Any, requested: list[str], web_service: Any, artifacts: Path
) -> None:
    page.goto(web_service.url + "/")
    # Dropped onto the drop zone: a text file that calls itself a PNG (415) ...
    page.evaluate(
        """() => {
          const data = new DataTransfer();
          data.items.add(new File(['not an image'], 'fake.png', {type: 'image/png'}));
          const zone = document.getElementById('dropzone');
          zone.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
        }"""
    )
    assert page.inner_text("#file-list") == "1 file: fake.png"
    assert page.evaluate("document.activeElement.id") == "submit"
    page.keyboard.press("Enter")
    rejected = page.locator(".job[data-status='rejected']", has_text="fake.png")
    rejected.wait_for()
    assert rejected.locator(".problem-title").inner_text() == "Unsupported image format"
    assert "PNG, JPEG or WebP" in rejected.locator(".job-error").inner_text()

    # ... and a parameter the form allows but the service refuses (a tag over 64 chars: 422).
    page.fill("#tags", "x" * 80)
    page.set_input_files(
        "#files", {"name": "good.png", "mimeType": "image/png", "buffer": png_bytes()}
    )
    page.click("#submit")
    refused = page.locator(".job[data-status='rejected']", has_text="good.png")
    refused.wait_for()
    assert refused.locator(".problem-title").inner_text() == "Invalid parameters"
    assert refused.locator(".job-error").get_attribute("role") == "alert"
    page.screenshot(path=str(artifacts / "04-rejected.png"), full_page=True)

    # Out-of-bounds values never leave the page: the browser's own validation stops them.
    page.fill("#steps", "500")
    before = page.locator(".job").count()
    page.click("#submit")
    assert page.eval_on_selector("#steps", "e => e.validity.rangeOverflow") is True
    assert page.locator(".job").count() == before
    _only_this_origin(requested, web_service.url)


def test_untrained_models_are_labelled_and_their_jobs_warned(
    page: Any, workerless_service: ServiceProcesses, artifacts: Path
) -> None:
    # A warm worker announces untrained SpaSemSR weights (as the tiny demo pipeline does); no
    # worker process is needed to render the page or to accept (then cancel) a job for it.
    # The service's default (lanczos) has no warm worker: the picker still offers it.
    connection = Redis.from_url(workerless_service.env["SPASEMSR_REDIS__URL"])
    registry = WorkerRegistry(connection, prefix="spasemsr")
    registry.announce(
        WorkerInfo(
            name="gpu-0",
            state=WorkerState.IDLE,
            serving=(ModelName.SPASEMSR,),
            models=[
                ModelInfo(
                    name=ModelName.SPASEMSR,
                    version="0.1",
                    configuration="tiny",
                    weights="seeded random",
                    trained=False,
                    device="cuda:0",
                    dtype="float16",
                )
            ],
            pid=1,
            hostname="test",
            started_at=datetime(2026, 1, 1, tzinfo=UTC),
        ),
        ttl_seconds=60,
    )
    try:
        page.goto(workerless_service.url + "/")
        expect(page.locator("#model option")).to_have_count(2)
        assert _picker(page) == [
            ("lanczos", "lanczos (default) — no warm worker yet"),
            ("spasemsr", "spasemsr — untrained"),
        ]
        assert page.eval_on_selector("#model", "s => s.value") == "lanczos"
        assert page.locator("#model-warning").is_hidden()  # lanczos is chosen
        page.select_option("#model", "spasemsr")
        warning = page.locator("#model-warning")
        warning.wait_for(state="visible")
        assert warning.get_attribute("role") == "alert"
        assert "untrained" in warning.inner_text().lower()
        assert page.inner_text("#model-name") == "spasemsr 0.1"
        assert "cuda:0" in page.inner_text("#model-details")
        assert "untrained" in page.inner_text("#model-details")

        # A job for the untrained model shows the model and the service's warning.
        page.set_input_files(
            "#files", {"name": "u.png", "mimeType": "image/png", "buffer": png_bytes()}
        )
        page.click("#submit")
        job = page.locator(".job", has_text="u.png")
        expect(job.locator(".job-status")).to_have_text("queued (next)")
        assert job.get_attribute("data-model") == "spasemsr"
        assert job.locator(".job-model").inner_text() == "Model: spasemsr (untrained)"
        warnings = job.locator(".job-warnings")
        assert warnings.is_visible()
        assert "spasemsr weights are untrained" in warnings.inner_text()
        page.screenshot(path=str(artifacts / "05-untrained-warning.png"), full_page=True)
        job.locator(".job-cancel").click()
        expect(job.locator(".job-status")).to_have_text("canceled")
    finally:
        registry.remove("gpu-0")
        connection.close()


PHONE = {"width": 390, "height": 844}
PAGE_WIDTH = "document.scrollingElement.scrollWidth"


def test_the_page_fits_a_phone_screen_before_and_with_a_job(
    page: Any, requested: list[str], web_service: Any, artifacts: Path
) -> None:
    page.set_viewport_size(PHONE)
    page.goto(web_service.url + "/")
    expect(page.locator("#model-name")).to_have_text("lanczos 1")
    assert page.evaluate(PAGE_WIDTH) <= PHONE["width"]
    # A long name without spaces and a result wider than the screen: both stay inside it
    # (the comparison scrolls within its own viewport).
    name = "holiday-photo-from-the-seaside-without-any-spaces-in-its-name.png"
    page.set_input_files(
        "#files", {"name": name, "mimeType": "image/png", "buffer": png_bytes(160, 100)}
    )
    page.click("#submit")
    expect(page.locator(".job", has_text=name)).to_have_attribute("data-status", "succeeded")
    page.wait_for_selector("#viewer:not([hidden])")
    expect(page.locator("#after-image")).to_have_js_property("complete", True)
    assert page.locator("#compare").bounding_box()["width"] > PHONE["width"]
    assert page.evaluate(PAGE_WIDTH) <= PHONE["width"]
    page.screenshot(path=str(artifacts / "07-phone.png"), full_page=True)
    _only_this_origin(requested, web_service.url)


def test_job_errors_say_each_thing_once(page: Any, web_service: Any) -> None:
    page.goto(web_service.url + "/")
    parts = "([problem, said]) => problemParts(problem, said)"
    canceled = {"title": "Job canceled", "detail": "Job canceled"}
    assert page.evaluate(parts, [canceled, ["canceled"]]) == []
    assert page.evaluate(parts, [canceled, []]) == ["Job canceled"]
    during = {"title": "Job canceled", "detail": "Canceled during denoise."}
    assert page.evaluate(parts, [during, ["canceled"]]) == ["Canceled during denoise."]
    failed = {"title": "Out of GPU memory", "detail": "Even 256-px tiles did not fit."}
    assert page.evaluate(parts, [failed, ["failed"]]) == [failed["title"], failed["detail"]]


def test_the_model_line_never_shows_a_server_path(
    page: Any, workerless_service: ServiceProcesses
) -> None:
    # A worker whose card carries paths (own weights named by a full path in the settings).
    connection = Redis.from_url(workerless_service.env["SPASEMSR_REDIS__URL"])
    registry = WorkerRegistry(connection, prefix="spasemsr")
    registry.announce(
        WorkerInfo(
            name="gpu-paths",
            state=WorkerState.IDLE,
            serving=(ModelName.REALESRGAN_X4PLUS,),
            models=[
                ModelInfo(
                    name=ModelName.REALESRGAN_X4PLUS,
                    version="custom",
                    configuration="RRDBNet from /srv/private/configs/x4.json",
                    weights="your checkpoint /srv/private/weights/RealESRGAN_x4plus.pth",
                    trained=True,
                    device="cuda:0",
                    dtype="float32",
                )
            ],
            pid=1,
            hostname="test",
            started_at=datetime(2026, 1, 1, tzinfo=UTC),
        ),
        ttl_seconds=60,
    )
    try:
        page.goto(workerless_service.url + "/")
        page.select_option("#model", "realesrgan-x4plus")
        details = page.locator("#model-details")
        expect(details).to_contain_text("RealESRGAN_x4plus.pth")
        assert "your checkpoint RealESRGAN_x4plus.pth" in details.inner_text()
        assert "/srv" not in page.inner_text("body")
    finally:
        registry.remove("gpu-paths")
        connection.close()


def test_queue_position_is_shown_until_a_worker_takes_the_jobs(
    page: Any, requested: list[str], workerless_service: ServiceProcesses, artifacts: Path
) -> None:
    # Runs last in this module: it starts the worker that the service had been waiting for.
    service = workerless_service
    page.goto(service.url + "/")
    expect(page.locator("#model-name")).to_have_text("unavailable")
    assert "No warm worker" in page.inner_text("#model-details")
    page.set_input_files(
        "#files",
        [
            {"name": f"q{i}.png", "mimeType": "image/png", "buffer": png_bytes(20 + i, 16)}
            for i in range(2)
        ],
    )
    page.select_option("#scale", "2")
    page.click("#submit")
    first = page.locator(".job", has_text="q0.png").locator(".job-status")
    second = page.locator(".job", has_text="q1.png").locator(".job-status")
    expect(first).to_have_text("queued (next)")
    expect(second).to_have_text("queued (1 ahead)")
    # Waiting is shown as an indeterminate bar (no value), not as 0 % done.
    bar = page.locator(".job", has_text="q0.png").locator(".job-progress")
    assert bar.evaluate("b => b.hasAttribute('value')") is False
    page.screenshot(path=str(artifacts / "06-queued.png"), full_page=True)

    service.start_worker()
    expect(first).to_have_text("succeeded")
    expect(second).to_have_text("succeeded")
    expect(page.locator("#model-name")).to_have_text("lanczos 1", timeout=10_000)
    _only_this_origin(requested, service.url)
