"""Super-resolution on real photographs bundled with scikit-image, for any upscaler.

The paper's test sets (DIV2K-Val, RealSR, DRealSR) are not available everywhere; this is a small
stand-in that needs nothing but scikit-image (its photos ship inside the package, no download).
It follows the DIV2K-Val recipe of the paper (DESIGN 1.5) on a handful of real photos:

1. HR: the centre ``crop`` x ``crop`` square of each photo (the largest centred square where the
   photo is smaller), its side a multiple of the scale;
2. LR: the project's own Real-ESRGAN second-order degradation (:func:`model.training.degradations.
   degrade_image`, x4 by default) with a fixed seed per photo, :func:`photo_seed`, derived from
   ``seed`` and the photo's name (so a photo gets the same LR whichever others are evaluated);
3. every upscaler x ``scale``; PSNR and SSIM on Y (BT.601) with a ``scale``-pixel border cropped,
   per photo and their mean.

The default photos (:data:`DEFAULT_PHOTOS`, all colour, all in ``skimage.data``):

- ``astronaut``: NASA portrait of the astronaut Eileen Collins, 512 x 512;
- ``chelsea``: Chelsea the cat (fur, whiskers), 451 x 300;
- ``coffee``: a coffee cup on a saucer, porcelain and wood grain, 600 x 400;
- ``rocket``: the launch of DSCOVR on a SpaceX Falcon 9, 640 x 427;
- ``motorcycle``: the left view of ``stereo_motorcycle`` (Middlebury 2014), 741 x 500;
- ``immunohistochemistry``: a stained micrograph of colonic glands, 512 x 512.

``hubble_deep_field`` (1000 x 872), ``retina`` (a fundus photograph, 1411 x 1411) and ``camera``
(grey, 512 x 512, replicated into RGB) can be asked for by name.

The tables (``results.md``, ``results.csv``, ``per_image.csv``) are written by
:func:`model.evaluation.benchmark.write_tables`; beside our rows they carry the paper's rows for the
methods in ``paper_methods``, marked as measured on different data: they are context, not
numbers to compare one for one. A figure (``comparison.png``) shows, for the first photos, the LR
input (nearest-neighbour enlarged so its pixels show), each upscaler's output and the HR crop
side by side, labelled with the photo and each output's PSNR / SSIM.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from model.evaluation.benchmark import (
    BASELINES,
    PAPER_RESULTS,
    EvaluationReport,
    ImageResult,
    SummaryRow,
    UpscaleFn,
    paper_rows,
    render_markdown,
    upscale_fn,
    write_tables,
)
from model.evaluation.metrics import psnr, ssim
from model.training.degradations import RealESRGANDegradationConfig, degrade_image

logger = logging.getLogger(__name__)

PHOTO_SET = "skimage photos"
"""The data-set name of our rows in the tables."""


@dataclass(frozen=True, kw_only=True)
class PhotoSource:
    """Where a photo is in ``skimage.data``."""

    name: str
    loader: str
    """The ``skimage.data`` function."""
    description: str
    index: int | None = None
    """Which element, for loaders returning a tuple (``stereo_motorcycle``: left, right, ...)."""


PHOTOS: dict[str, PhotoSource] = {
    source.name: source
    for source in (
        PhotoSource(
            name="astronaut", loader="astronaut", description="NASA portrait of Eileen Collins"
        ),
        PhotoSource(name="chelsea", loader="chelsea", description="a cat"),
        PhotoSource(name="coffee", loader="coffee", description="a coffee cup"),
        PhotoSource(name="rocket", loader="rocket", description="a Falcon 9 launch"),
        PhotoSource(
            name="motorcycle",
            loader="stereo_motorcycle",
            index=0,
            description="Middlebury 2014, left view",
        ),
        PhotoSource(
            name="immunohistochemistry",
            loader="immunohistochemistry",
            description="a stained micrograph",
        ),
        PhotoSource(
            name="hubble_deep_field",
            loader="hubble_deep_field",
            description="Hubble eXtreme Deep Field",
        ),
        PhotoSource(name="retina", loader="retina", description="a fundus photograph"),
        PhotoSource(name="camera", loader="camera", description="grey, replicated into RGB"),
    )
}
DEFAULT_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "immunohistochemistry",
)
PAPER_BENCHMARKS: tuple[str, ...] = ("DIV2K-Val", "RealSR", "DRealSR")
"""The paper's benchmarks whose rows go beside ours (DIV2K-Val is the same kind of protocol:
Real-ESRGAN-degraded HR crops; RealSR and DRealSR are real camera pairs)."""
FIGURE_FILE = "comparison.png"


def load_photo(name: str) -> Image.Image:
    """The RGB photo ``name`` (a key of :data:`PHOTOS`) from ``skimage.data``; grey becomes RGB."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; known: {sorted(PHOTOS)}")
    try:
        from skimage import data
    except ImportError as error:  # pragma: no cover - scikit-image is a dev dependency
        raise ModuleNotFoundError(
            "the photo evaluation needs scikit-image (pip install scikit-image)"
        ) from error
    source = PHOTOS[name]
    loaded = getattr(data, source.loader)()
    array = np.asarray(loaded[source.index] if source.index is not None else loaded)
    if array.dtype != np.uint8:
        raise ValueError(f"skimage.data.{source.loader} is {array.dtype}, expected uint8")
    return Image.fromarray(array).convert("RGB")


def photo_seed(seed: int, name: str) -> int:
    """The degradation seed of photo ``name``: fixed by ``seed`` and the name alone."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def centre_square(image: Image.Image, side: int, *, multiple: int = 1) -> Image.Image:
    """The centre ``side`` square (smaller where the image is), its side a multiple of
    ``multiple``."""
    side = min(side, image.width, image.height)
    side -= side % multiple
    if side < 1:
        raise ValueError(
            f"{image.size} image too small for a crop that is a multiple of {multiple}"
        )
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


@dataclass(frozen=True, kw_only=True)
class DegradedPhoto:
    name: str
    hr: Image.Image
    lr: Image.Image
    seed: int
    """The degradation seed (:func:`photo_seed`)."""


def make_photo_set(
    photos: Sequence[str] | None = None,
    *,
    crop: int = 256,
    seed: int = 0,
    config: RealESRGANDegradationConfig | None = None,
) -> list[DegradedPhoto]:
    """HR centre crops of the photos and their Real-ESRGAN-degraded LR (deterministic)."""
    names = list(DEFAULT_PHOTOS if photos is None else photos)
    if not names:
        raise ValueError("no photo to evaluate")
    if len(set(names)) != len(names):
        raise ValueError(f"photos repeat: {names}")
    config = config or RealESRGANDegradationConfig()
    if crop < config.scale:
        raise ValueError(f"crop {crop} must be at least the scale {config.scale}")
    out = []
    for name in names:
        hr = centre_square(load_photo(name), crop, multiple=config.scale)
        fixed = photo_seed(seed, name)
        lr = degrade_image(hr, seed=fixed, config=config)
        out.append(DegradedPhoto(name=name, hr=hr, lr=lr, seed=fixed))
    return out


def realesrgan_upscale_fn(
    *,
    cache_root: Path,
    model: str = "realesrgan-x4plus",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UpscaleFn:
    """The published Real-ESRGAN weights ``model`` (:mod:`model.upscalers.realesrgan`) as an
    upscaler."""
    from model.upscalers.realesrgan import RealESRGANUpscaler

    upscaler = RealESRGANUpscaler.from_catalogue(
        model, cache_root=cache_root, device=device, dtype=dtype
    )
    return upscale_fn(upscaler)


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------

_MARGIN = 8
_GAP = 6
_FONT_SIZE = 14


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font() -> Font:
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except (OSError, TypeError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a long word stays)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def comparison_figure(
    headers: Sequence[str],
    rows: Sequence[Sequence[tuple[Image.Image, str]]],
) -> Image.Image:
    """A labelled grid: ``headers`` over the columns, each cell an image with its caption below.

    All images of a column should share a size; cells are as large as the largest image.
    """
    if not rows or any(len(row) != len(headers) for row in rows):
        raise ValueError("every figure row needs one (image, caption) per header")
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 4
    cell_w = max(image.width for row in rows for image, _ in row)
    cell_h = max(image.height for row in rows for image, _ in row)
    wrapped_headers = [_wrap(probe, h, font, cell_w) for h in headers]
    captions = [[_wrap(probe, c, font, cell_w) for _, c in row] for row in rows]
    header_h = line * max(len(w) for w in wrapped_headers)
    caption_h = [line * max(len(c) for c in row) for row in captions]
    width = 2 * _MARGIN + len(headers) * cell_w + (len(headers) - 1) * _GAP
    height = 2 * _MARGIN + header_h + sum(cell_h + c + _GAP for c in caption_h)
    figure = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    for column, lines in enumerate(wrapped_headers):
        x = _MARGIN + column * (cell_w + _GAP)
        for index, text in enumerate(lines):
            draw.text((x, _MARGIN + index * line), text, fill=(0, 0, 0), font=font)
    y = _MARGIN + header_h
    for row, row_captions, row_caption_h in zip(rows, captions, caption_h, strict=True):
        for column, ((image, _), lines) in enumerate(zip(row, row_captions, strict=True)):
            x = _MARGIN + column * (cell_w + _GAP)
            figure.paste(image.convert("RGB"), (x, y))
            for index, text in enumerate(lines):
                position = (x, y + image.height + 2 + index * line)
                draw.text(position, text, fill=(60, 60, 60), font=font)
        y += cell_h + row_caption_h + _GAP
    return figure


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _paper_context_rows(methods: Sequence[str], metrics: Sequence[str]) -> list[SummaryRow]:
    rows = []
    for benchmark in PAPER_BENCHMARKS:
        note = f"different data ({benchmark}): not comparable number-for-number"
        for row in paper_rows(benchmark, benchmark, "all", note=note):
            if row.method in methods:
                kept = {m: v for m, v in row.metrics.items() if m in metrics}
                rows.append(replace(row, metrics=kept))
    return rows


def evaluate_photos(
    upscalers: Mapping[str, UpscaleFn],
    *,
    out_dir: Path,
    seed: int = 0,
    crop: int = 256,
    photos: Sequence[str] | None = None,
    scale: int = 4,
    include_baselines: bool = True,
    paper_methods: Sequence[str] = ("Real-ESRGAN", "SpaSemSR"),
    figure_photos: int = 4,
    figure_methods: Sequence[str] | None = None,
    figure_panel: int = 256,
    save_images: bool = False,
) -> EvaluationReport:
    """Run every upscaler over the skimage photos (module docstring) and write tables + figure.

    ``upscalers`` map a row name to ``upscale(image, scale)`` (e.g. ``{"Real-ESRGAN x4plus":
    realesrgan_upscale_fn(...), "SpaSemSR": upscale_fn(spasemsr, steps=20, seed=0)}``); the
    ``bicubic`` and ``lanczos`` baselines come first unless ``include_baselines`` is false.
    ``photos`` default to :data:`DEFAULT_PHOTOS`; ``crop`` is the HR side (the paper's patches
    are 512; 256 keeps CPU time low). The paper's rows for ``paper_methods`` on
    :data:`PAPER_BENCHMARKS` are added, marked as different data.

    Writes ``results.md``, ``results.csv``, ``per_image.csv`` and, unless ``figure_photos`` is
    0, ``comparison.png`` (the first ``figure_photos`` photos; columns: the LR input enlarged
    nearest-neighbour, the ``figure_methods`` — by default every method but the Lanczos
    baseline, which looks like bicubic — and the HR; each the centre ``figure_panel`` square at
    1:1) into ``out_dir``; with ``save_images`` also ``images/{hr,lr,<method>}/<photo>.png``.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    unknown = set(paper_methods) - set(PAPER_RESULTS["DIV2K-Val"])
    if unknown:
        raise ValueError(f"the paper has no rows for {sorted(unknown)}")
    methods: dict[str, UpscaleFn] = {}
    if include_baselines:
        methods.update({k: v for k, v in BASELINES.items() if k not in upscalers})
    methods.update(upscalers)
    if not methods:
        raise ValueError("no upscaler to evaluate")
    if figure_methods is None:
        figure_methods = [m for m in methods if m != "lanczos" or len(methods) == 1]
    missing = [m for m in figure_methods if m not in methods]
    if missing:
        raise ValueError(f"figure methods {missing} are not among the upscalers {list(methods)}")
    if figure_photos < 0 or figure_panel < 1:
        raise ValueError("figure_photos must be >= 0 and figure_panel >= 1")

    config = RealESRGANDegradationConfig(scale=scale)
    photo_set = make_photo_set(photos, crop=crop, seed=seed, config=config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: list[ImageResult] = []
    per_photo_rows: list[SummaryRow] = []
    figure_rows: list[list[tuple[Image.Image, str]]] = []
    for index, photo in enumerate(photo_set):
        logger.info("photo %d/%d: %s", index + 1, len(photo_set), photo.name)
        outputs: dict[str, tuple[Image.Image, dict[str, float]]] = {}
        for method, function in methods.items():
            started = time.perf_counter()
            output = function(photo.lr, scale)
            seconds = time.perf_counter() - started
            if output.size != photo.hr.size:
                raise ValueError(
                    f"upscaler {method!r} returned {output.size} for a {photo.lr.size} input at "
                    f"x{scale}; expected {photo.hr.size}"
                )
            output = output.convert("RGB")
            values = {
                "psnr": psnr(output, photo.hr, crop_border=scale),
                "ssim": ssim(output, photo.hr, crop_border=scale),
            }
            outputs[method] = (output, values)
            results.append(
                ImageResult(
                    dataset=PHOTO_SET,
                    method=method,
                    image=photo.name,
                    metrics=values,
                    seconds=seconds,
                )
            )
            per_photo_rows.append(
                SummaryRow(
                    dataset=photo.name,
                    benchmark=None,
                    method=method,
                    source="ours",
                    images=1,
                    metrics=dict(values),
                    seconds_per_image=seconds,
                )
            )
            if save_images:
                target = out_dir / "images" / method / f"{photo.name}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                output.save(target)
        if save_images:
            for kind, image in (("hr", photo.hr), ("lr", photo.lr)):
                target = out_dir / "images" / kind / f"{photo.name}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                image.save(target)
        if index < figure_photos:
            side = min(figure_panel, photo.hr.width)
            enlarged = photo.lr.resize(photo.hr.size, Image.Resampling.NEAREST)
            cells = [(centre_square(enlarged, side), f"{photo.name}: LR {photo.lr.width} px")]
            for method in figure_methods:
                output, values = outputs[method]
                caption = f"{values['psnr']:.2f} dB / SSIM {values['ssim']:.3f}"
                cells.append((centre_square(output, side), caption))
            shown = f" (centre {side} shown)" if side < photo.hr.width else ""
            cells.append((centre_square(photo.hr, side), f"HR {photo.hr.width} px{shown}"))
            figure_rows.append(cells)

    mean_rows = [
        SummaryRow(
            dataset=PHOTO_SET,
            benchmark=None,
            method=method,
            source="ours",
            images=len(photo_set),
            metrics={
                m: _mean(r.metrics[m] for r in results if r.method == method)
                for m in ("psnr", "ssim")
            },
            seconds_per_image=_mean(r.seconds for r in results if r.method == method),
        )
        for method in methods
    ]
    rows = mean_rows + _paper_context_rows(paper_methods, ("psnr", "ssim"))

    figure_path = None
    if figure_rows:
        headers = [f"LR input (nearest x{scale})", *figure_methods, "HR (reference)"]
        figure_path = out_dir / FIGURE_FILE
        comparison_figure(headers, figure_rows).save(figure_path)

    names = [p.name for p in photo_set]
    settings: dict[str, object] = {
        "scale": scale,
        "crop": crop,
        "seed": seed,
        "photos": names,
        "photo_seeds": {p.name: p.seed for p in photo_set},
        "methods": list(methods),
        "figure": str(figure_path) if figure_path else None,
    }
    protocol = [
        f"Protocol: HR = centre {crop} px square of each photo (smaller where the photo is); "
        f"LR = the project's Real-ESRGAN second-order degradation x{scale} at fixed seeds "
        f"(base seed {seed}); PSNR/SSIM on Y (BT.601) with a {scale}-pixel border cropped.",
        "Paper rows: arXiv 2603.14112 Tables 1-2, measured on DIV2K-Val / RealSR / DRealSR, "
        "not on these photos: different data, shown for context only, not comparable "
        "number-for-number.",
    ]
    parts = [
        f"# Super-resolution x{scale} on {len(names)} scikit-image photos",
        "",
        "Photos: " + ", ".join(f"{n} ({PHOTOS[n].description})" for n in names) + ".",
        "",
        f"## Mean over {len(names)} photos",
        "",
        render_markdown(rows, (), settings, protocol=protocol),
        "## Per photo",
        "",
        render_markdown(per_photo_rows, (), settings, protocol=()),
    ]
    if figure_path is not None:
        parts += [f"Figure: [{FIGURE_FILE}]({FIGURE_FILE})", ""]
    return write_tables(
        out_dir, rows, results, (), settings, markdown="\n".join(parts), figure_path=figure_path
    )
