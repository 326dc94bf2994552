"""The benchmark protocol of the paper (DESIGN 1.5), for any upscaler.

Data sets are read from folders laid out like the public test sets:

- ``realsr``: RealSR (Cai et al. 2019) ``<root>/{Canon,Nikon}/Test/<s>/<name>_HR.png`` beside
  ``<name>_LR<s>.png``;
- ``drealsr``: DRealSR (Wei et al. 2020) ``<root>/test_x<s>/test_HR/<name>_x1.png`` and
  ``test_LR/<name>_x<s>.png`` (also a bare ``test_HR`` / ``test_LR`` pair);
- ``gt_lq``: StableSR-style patch sets such as its 3,000 DIV2K-val patches, ``<root>/gt`` and
  ``<root>/lq`` with the same file names;
- ``lr_only``: a folder of LR images without ground truth (RealLR200).

The protocol follows StableSR (Wang et al. 2024), as SpaSemSR does: a ``128 x 128`` centre crop of
each LR image is super-resolved x4 to ``512 x 512`` and compared with the matching HR crop; PSNR
and SSIM on the Y channel with a border of ``scale`` pixels cropped, and the learned metrics whose
weights are present locally. Results go to a Markdown and a CSV table with the paper's own numbers
(Tables 1 and 2 of arXiv 2603.14112) beside ours, and bicubic and Lanczos baseline rows.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from model.evaluation.metrics import (
    LEARNED_METRICS,
    LearnedMetric,
    LearnedMetricName,
    LearnedMetricPaths,
    MetricStatus,
    load_learned_metrics,
    psnr,
    ssim,
)
from model.training.degradations import RealESRGANDegradationConfig, degrade_image
from model.upscalers.base import UpscaleOptions, Upscaler
from model.upscalers.lanczos import LanczosUpscaler

logger = logging.getLogger(__name__)

UpscaleFn = Callable[[Image.Image, int], Image.Image]
"""``upscale(image, scale) -> image`` exactly ``scale`` times larger."""
Layout = Literal["realsr", "drealsr", "gt_lq", "lr_only"]
Benchmark = Literal["DIV2K-Val", "RealSR", "DRealSR", "RealLR200"]
MetricName = Literal["psnr", "ssim", "lpips", "clipiqa", "musiq", "maniqa"]

ALL_METRICS: tuple[MetricName, ...] = ("psnr", "ssim", "lpips", "clipiqa", "musiq", "maniqa")
METRIC_LABELS: dict[str, str] = {
    "psnr": "PSNR↑",
    "ssim": "SSIM↑",
    "lpips": "LPIPS↓",
    "clipiqa": "CLIP-IQA↑",
    "musiq": "MUSIQ↑",
    "maniqa": "MANIQA↑",
}
_DECIMALS = {"psnr": 2, "ssim": 4, "lpips": 4, "clipiqa": 4, "musiq": 2, "maniqa": 4}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# ---------------------------------------------------------------------------------------------
# The paper's numbers (arXiv 2603.14112, Table 1 vs GAN methods, Table 2 vs diffusion methods):
# PSNR, SSIM, CLIP-IQA, MUSIQ, MANIQA. Transcribed from paper/table1.png and table2.png only.
# ---------------------------------------------------------------------------------------------

_PAPER_METRICS: tuple[MetricName, ...] = ("psnr", "ssim", "clipiqa", "musiq", "maniqa")
PAPER_RESULTS: dict[str, dict[str, tuple[float, float, float, float, float]]] = {
    "DIV2K-Val": {
        "SpaSemSR": (21.31, 0.5340, 0.6932, 63.32, 0.4945),
        "BSRGAN": (21.74, 0.5530, 0.5234, 59.16, 0.3528),
        "Real-ESRGAN": (21.86, 0.5746, 0.5485, 58.80, 0.3776),
        "SwinIR": (21.45, 0.5639, 0.5467, 59.03, 0.3634),
        "StableSR": (20.74, 0.4888, 0.6605, 63.19, 0.4002),
        "DiffBIR": (20.57, 0.4740, 0.7359, 69.93, 0.5763),
        "PASD": (20.77, 0.5022, 0.6140, 63.29, 0.4581),
        "SeeSR": (21.00, 0.5362, 0.7074, 68.81, 0.5149),
        "XPSR": (20.56, 0.5081, 0.7826, 70.07, 0.6108),
        "FaithDiff": (20.63, 0.4999, 0.6545, 69.62, 0.4427),
    },
    "RealSR": {
        "SpaSemSR": (25.74, 0.7306, 0.5893, 62.96, 0.4637),
        "BSRGAN": (26.38, 0.7651, 0.5112, 63.28, 0.3754),
        "Real-ESRGAN": (25.69, 0.7614, 0.4490, 60.37, 0.3730),
        "SwinIR": (26.31, 0.7729, 0.4364, 58.69, 0.3444),
        "StableSR": (24.70, 0.7085, 0.6166, 65.18, 0.4178),
        "DiffBIR": (24.83, 0.6501, 0.7054, 69.28, 0.5596),
        "PASD": (25.26, 0.7191, 0.6249, 67.78, 0.4971),
        "SeeSR": (25.15, 0.7210, 0.6704, 69.82, 0.5395),
        "XPSR": (23.74, 0.6734, 0.7417, 71.45, 0.6293),
        "FaithDiff": (25.25, 0.7054, 0.6152, 68.78, 0.4628),
    },
    "DRealSR": {
        "SpaSemSR": (28.97, 0.7826, 0.5630, 55.79, 0.3998),
        "BSRGAN": (28.70, 0.8028, 0.5093, 57.16, 0.3447),
        "Real-ESRGAN": (28.61, 0.8052, 0.4517, 54.27, 0.3448),
        "SwinIR": (28.50, 0.8044, 0.4445, 52.74, 0.3298),
        "StableSR": (28.07, 0.7489, 0.6375, 58.99, 0.3892),
        "DiffBIR": (25.90, 0.6245, 0.7068, 66.13, 0.5526),
        "PASD": (27.07, 0.7251, 0.6710, 64.56, 0.5061),
        "SeeSR": (28.07, 0.7684, 0.6911, 65.09, 0.5115),
        "XPSR": (26.55, 0.7289, 0.7433, 67.02, 0.5684),
        "FaithDiff": (27.42, 0.7193, 0.6352, 66.58, 0.4502),
    },
}
"""The paper reports no numbers for RealLR200 in these tables."""

PaperRows = Literal["none", "spasemsr", "all"]


# ---------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ImagePair:
    name: str
    lr: Path
    hr: Path | None = None


@dataclass(frozen=True, kw_only=True)
class EvalDataset:
    """A test set found on disk: its LR images and, where it has them, the HR references."""

    name: str
    layout: Layout
    scale: int
    pairs: tuple[ImagePair, ...]
    benchmark: Benchmark | None = None
    """The paper's benchmark this set is, whose published numbers go beside ours."""
    root: Path | None = None

    @property
    def has_reference(self) -> bool:
        return bool(self.pairs) and all(p.hr is not None for p in self.pairs)


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )


def _pair_key(stem: str) -> str:
    """The name shared by an HR and its LR: strip ``_HR``, ``_LR4``, ``_x1``, ``_x4`` suffixes."""
    return re.sub(r"(?i)[_-](hr|lr\d*|x\d+)$", "", stem)


def _pair_folders(hr_dir: Path, lr_dir: Path) -> list[ImagePair]:
    hr_by_key = {_pair_key(p.stem): p for p in _images_in(hr_dir)}
    pairs = []
    for lr in _images_in(lr_dir):
        key = _pair_key(lr.stem)
        if key not in hr_by_key:
            logger.warning("no HR image for %s in %s: skipped", lr.name, hr_dir)
            continue
        pairs.append(ImagePair(name=key, lr=lr, hr=hr_by_key[key]))
    return pairs


def _find_realsr(root: Path, scale: int) -> list[ImagePair]:
    pairs = []
    for hr in sorted(root.rglob("*_HR.*")):
        if hr.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        matches = list(hr.parent.glob(f"{hr.stem[: -len('_HR')]}_LR{scale}.*"))
        if matches:
            name = str(hr.parent.relative_to(root) / hr.stem[: -len("_HR")])
            pairs.append(ImagePair(name=name.replace("\\", "/"), lr=matches[0], hr=hr))
    in_test = [p for p in pairs if "Test" in p.hr.parts]  # type: ignore[union-attr]
    return in_test or pairs


_HR_FOLDERS = ("test_HR", "gt", "GT", "HR", "hr")
_LR_FOLDERS = ("test_LR", "lq", "LQ", "LR", "lr")


def _find_folder_pair(root: Path) -> tuple[Path, Path] | None:
    for hr_name in _HR_FOLDERS:
        for lr_name in _LR_FOLDERS:
            if (root / hr_name).is_dir() and (root / lr_name).is_dir():
                return root / hr_name, root / lr_name
    return None


def _benchmark_from_name(name: str) -> Benchmark | None:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    known: dict[str, Benchmark] = {
        "div2kval": "DIV2K-Val",
        "div2k": "DIV2K-Val",
        "realsr": "RealSR",
        "drealsr": "DRealSR",
        "reallr200": "RealLR200",
    }
    return known.get(key)


def discover_dataset(
    root: Path,
    *,
    name: str | None = None,
    scale: int = 4,
    layout: Layout | Literal["auto"] = "auto",
    benchmark: Benchmark | Literal["auto"] | None = "auto",
) -> EvalDataset:
    """Find the images of a test set under ``root`` in one of the known layouts.

    ``layout="auto"`` tries RealSR, DRealSR, gt/lq folders, then a flat folder of LR images.
    ``benchmark="auto"`` takes it from the name (e.g. a folder called ``RealSR``).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data set folder {root} does not exist")
    name = name or root.name
    candidates: list[Layout] = (
        ["realsr", "drealsr", "gt_lq", "lr_only"] if layout == "auto" else [layout]
    )
    for candidate in candidates:
        pairs: list[ImagePair] = []
        if candidate == "realsr":
            pairs = _find_realsr(root, scale)
        elif candidate == "drealsr":
            for base in (root / f"test_x{scale}", root):
                if (base / "test_HR").is_dir() and (base / "test_LR").is_dir():
                    pairs = _pair_folders(base / "test_HR", base / "test_LR")
                    break
        elif candidate == "gt_lq":
            folders = _find_folder_pair(root)
            if folders is not None:
                pairs = _pair_folders(*folders)
        else:
            pairs = [ImagePair(name=p.stem, lr=p) for p in _images_in(root)]
        if pairs:
            found = _benchmark_from_name(name) if benchmark == "auto" else benchmark
            logger.info("%s: %d images in the %s layout", name, len(pairs), candidate)
            return EvalDataset(
                name=name,
                layout=candidate,
                scale=scale,
                pairs=tuple(pairs),
                benchmark=found,
                root=root,
            )
    raise ValueError(
        f"no test images found under {root} (looked for layouts {candidates}; see "
        "model.evaluation.benchmark's module docstring for the expected folder structure)"
    )


# ---------------------------------------------------------------------------------------------
# Protocol: crops, upscalers
# ---------------------------------------------------------------------------------------------


def centre_crop_pair(
    lr: Image.Image, hr: Image.Image | None, *, scale: int, lr_crop: int | None
) -> tuple[Image.Image, Image.Image | None]:
    """StableSR's crop: the centre ``lr_crop`` square of the LR and the matching HR region.

    An LR registered at the HR's size (early RealSR releases) is first down-scaled by ``scale``
    (bicubic), which is how the field evaluates those pairs. ``lr_crop=None`` keeps whole images.
    """
    lr = lr.convert("RGB")
    if hr is not None:
        hr = hr.convert("RGB")
        if lr.size == hr.size and scale > 1:
            logger.info("LR has the HR's size: bicubic down-scaling it by %d first", scale)
            lr = lr.resize((lr.width // scale, lr.height // scale), Image.Resampling.BICUBIC)
        # The usable LR region is the one whose x``scale`` footprint lies inside the HR.
        usable = (min(lr.width, hr.width // scale), min(lr.height, hr.height // scale))
        if usable != lr.size:
            lr = lr.crop((0, 0, *usable))
    width, height = lr.size
    crop_w = width if lr_crop is None else min(lr_crop, width)
    crop_h = height if lr_crop is None else min(lr_crop, height)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    lr_patch = lr.crop((left, top, left + crop_w, top + crop_h))
    if hr is None:
        return lr_patch, None
    box = (left * scale, top * scale, (left + crop_w) * scale, (top + crop_h) * scale)
    return lr_patch, hr.crop(box)


def bicubic_upscale(image: Image.Image, scale: int) -> Image.Image:
    """The bicubic baseline (Pillow's bicubic, a = -0.5)."""
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)


_LANCZOS = LanczosUpscaler()


def lanczos_upscale(image: Image.Image, scale: int) -> Image.Image:
    """The Lanczos baseline, through the service's own classical upscaler."""
    return _LANCZOS.upscale(image, UpscaleOptions(scale=scale)).image


BASELINES: dict[str, UpscaleFn] = {"bicubic": bicubic_upscale, "lanczos": lanczos_upscale}


def upscale_fn(upscaler: Upscaler, **options: object) -> UpscaleFn:
    """Adapt an :class:`~model.upscalers.base.Upscaler` (e.g. SpaSemSR) to
    ``upscale(image, scale)``.

    ``options`` are further :class:`~model.upscalers.base.UpscaleOptions` fields (steps, seed, ...).
    """

    def run(image: Image.Image, scale: int) -> Image.Image:
        request = UpscaleOptions(scale=scale, **options)  # type: ignore[arg-type]
        return upscaler.upscale(image, request).image

    return run


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ImageResult:
    dataset: str
    method: str
    image: str
    metrics: Mapping[str, float]
    seconds: float


@dataclass(frozen=True, kw_only=True)
class SummaryRow:
    """One table row: our mean over a data set, or a number published in the paper."""

    dataset: str
    benchmark: str | None
    method: str
    source: Literal["ours", "paper"]
    images: int
    metrics: Mapping[str, float | None]
    seconds_per_image: float | None = None
    note: str = ""
    """Shown beside the source, e.g. that a paper row was measured on other data."""


@dataclass(frozen=True, kw_only=True)
class EvaluationReport:
    rows: tuple[SummaryRow, ...]
    images: tuple[ImageResult, ...]
    metric_status: tuple[MetricStatus, ...]
    markdown: str
    markdown_path: Path
    csv_path: Path
    per_image_csv_path: Path
    settings: Mapping[str, object] = field(default_factory=dict)
    figure_path: Path | None = None
    """A side-by-side comparison figure, where the evaluation draws one."""

    def row(self, dataset: str, method: str, source: str = "ours") -> SummaryRow:
        for row in self.rows:
            if (row.dataset, row.method, row.source) == (dataset, method, source):
                return row
        raise KeyError(f"no {source} row for {method} on {dataset}")


def _format(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{value:.{_DECIMALS.get(metric, 4)}f}"


def render_markdown(
    rows: Sequence[SummaryRow],
    metric_status: Sequence[MetricStatus],
    settings: Mapping[str, object],
    *,
    protocol: Sequence[str] | None = None,
) -> str:
    """The results table in Markdown: one block per data set, ours first, the paper's after.

    ``protocol`` replaces the notes under the table that describe the folder protocol (an empty
    sequence writes none); a row's ``note`` is shown beside its source.
    """
    columns = [m for m in ALL_METRICS if any(r.metrics.get(m) is not None for r in rows)]
    columns = columns or ["psnr", "ssim"]
    header = ["Data set", "Method", "Source", "Images", *[METRIC_LABELS[m] for m in columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        label = row.dataset if row.source == "ours" else f"{row.benchmark} (paper)"
        source = f"{row.source}, {row.note}" if row.note else row.source
        cells = [label, row.method, source, str(row.images) if row.images else "–"]
        cells += [_format(m, row.metrics.get(m)) for m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if protocol is None:
        protocol = [
            f"Protocol: LR centre crop {settings.get('lr_crop')} px, x{settings.get('scale')}, "
            f"PSNR/SSIM on Y (BT.601) with a {settings.get('scale')}-pixel border cropped; "
            "SSIM with an 11x11 Gaussian window, sigma 1.5.",
            "Paper rows: arXiv 2603.14112 Tables 1-2, measured on the real benchmark of that name.",
        ]
    notes = ["", *protocol] if protocol else []
    skipped = [s for s in metric_status if not s.available]
    if skipped:
        notes += [""] if not notes else []
        notes.append("Skipped metrics:")
        notes += [f"- {s.name}: {s.reason}" for s in skipped]
    return "\n".join(lines + notes) + "\n"


def _csv_text(rows: Sequence[SummaryRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "dataset",
            "benchmark",
            "method",
            "source",
            "images",
            "seconds_per_image",
            *ALL_METRICS,
            "note",
        ]
    )
    for row in rows:
        seconds = "" if row.seconds_per_image is None else f"{row.seconds_per_image:.4f}"
        values = ["" if row.metrics.get(m) is None else repr(row.metrics[m]) for m in ALL_METRICS]
        writer.writerow(
            [
                row.dataset,
                row.benchmark or "",
                row.method,
                row.source,
                row.images,
                seconds,
                *values,
                row.note,
            ]
        )
    return buffer.getvalue()


def _per_image_csv_text(results: Sequence[ImageResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "method", "image", "seconds", *ALL_METRICS])
    for result in results:
        values = [repr(result.metrics[m]) if m in result.metrics else "" for m in ALL_METRICS]
        writer.writerow(
            [result.dataset, result.method, result.image, f"{result.seconds:.4f}", *values]
        )
    return buffer.getvalue()


def paper_rows(
    benchmark: str | None, dataset: str, which: PaperRows, *, note: str = ""
) -> list[SummaryRow]:
    """The paper's published rows for ``benchmark`` (none for sets it gives no numbers for)."""
    if which == "none" or benchmark not in PAPER_RESULTS:
        return []
    rows = []
    for method, values in PAPER_RESULTS[benchmark].items():
        if which == "spasemsr" and method != "SpaSemSR":
            continue
        metrics: dict[str, float | None] = dict(zip(_PAPER_METRICS, values, strict=True))
        rows.append(
            SummaryRow(
                dataset=dataset,
                benchmark=benchmark,
                method=method,
                source="paper",
                images=0,
                metrics=metrics,
                note=note,
            )
        )
    return rows


def write_tables(
    out_dir: Path,
    rows: Sequence[SummaryRow],
    results: Sequence[ImageResult],
    metric_status: Sequence[MetricStatus],
    settings: Mapping[str, object],
    *,
    markdown: str | None = None,
    figure_path: Path | None = None,
) -> EvaluationReport:
    """Write ``results.md``, ``results.csv`` and ``per_image.csv`` into ``out_dir``.

    ``markdown`` is the text of ``results.md``; by default :func:`render_markdown` of ``rows``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if markdown is None:
        markdown = render_markdown(rows, metric_status, settings)
    markdown_path = out_dir / "results.md"
    csv_path = out_dir / "results.csv"
    per_image_path = out_dir / "per_image.csv"
    markdown_path.write_text(markdown, encoding="utf-8")
    csv_path.write_text(_csv_text(rows), encoding="utf-8")
    per_image_path.write_text(_per_image_csv_text(results), encoding="utf-8")
    return EvaluationReport(
        rows=tuple(rows),
        images=tuple(results),
        metric_status=tuple(metric_status),
        markdown=markdown,
        markdown_path=markdown_path,
        csv_path=csv_path,
        per_image_csv_path=per_image_path,
        settings=settings,
        figure_path=figure_path,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float | None:
    finite = list(values)
    if not finite:
        return None
    return float(np.mean(finite))


def evaluate(
    datasets: Sequence[EvalDataset | Path],
    upscalers: Mapping[str, UpscaleFn],
    *,
    out_dir: Path,
    metrics: Sequence[MetricName] = ALL_METRICS,
    metric_paths: LearnedMetricPaths | None = None,
    learned_metrics: Mapping[str, LearnedMetric] | None = None,
    scale: int = 4,
    lr_crop: int | None = 128,
    lr_only_crop: int | None = None,
    include_baselines: bool = True,
    paper: PaperRows = "all",
    max_images: int | None = None,
    save_images: bool = False,
    device: torch.device | str = "cpu",
) -> EvaluationReport:
    """Run every upscaler over every data set with the paper's protocol (DESIGN 1.5).

    ``datasets`` are discovered sets or folders (discovered with ``scale``). ``upscalers`` map a
    method name to ``upscale(image, scale)``; the bicubic and Lanczos baselines are added unless
    ``include_baselines`` is false. Learned metrics come from ``learned_metrics`` when given,
    otherwise they are loaded from ``metric_paths``; those that cannot be built are skipped and
    reported. Writes ``results.md``, ``results.csv`` and ``per_image.csv`` into ``out_dir``.
    """
    unknown = set(metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {ALL_METRICS}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    methods: dict[str, UpscaleFn] = dict(upscalers)
    if include_baselines:
        for name, function in BASELINES.items():
            methods.setdefault(name, function)
    if not methods:
        raise ValueError("no upscaler to evaluate")
    sets = [
        d if isinstance(d, EvalDataset) else discover_dataset(Path(d), scale=scale)
        for d in datasets
    ]
    if not sets:
        raise ValueError("no data set to evaluate")

    # 1. Learned metrics: the ones asked for, from local weights only.
    wanted: tuple[LearnedMetricName, ...] = tuple(m for m in LEARNED_METRICS if m in metrics)
    learned: dict[str, LearnedMetric]
    if learned_metrics is not None:
        learned = {k: v for k, v in learned_metrics.items() if k in wanted}
        status = [
            MetricStatus(name=m, available=m in learned, reason="" if m in learned else "not given")
            for m in wanted
        ]
    else:
        learned, status = load_learned_metrics(
            metric_paths or LearnedMetricPaths(), names=wanted, device=device
        )

    # 2. Every image of every set through every method.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[ImageResult] = []
    rows: list[SummaryRow] = []
    for dataset in sets:
        crop = lr_crop if dataset.has_reference else lr_only_crop
        pairs = dataset.pairs[:max_images] if max_images else dataset.pairs
        per_method: dict[str, list[ImageResult]] = {name: [] for name in methods}
        for index, pair in enumerate(pairs):
            logger.info("%s: image %d/%d (%s)", dataset.name, index + 1, len(pairs), pair.name)
            with Image.open(pair.lr) as lr_file:
                lr_image = lr_file.convert("RGB")
            hr_image = None
            if pair.hr is not None:
                with Image.open(pair.hr) as hr_file:
                    hr_image = hr_file.convert("RGB")
            lr_patch, hr_patch = centre_crop_pair(
                lr_image, hr_image, scale=dataset.scale, lr_crop=crop
            )
            for method, function in methods.items():
                started = time.perf_counter()
                output = function(lr_patch, dataset.scale)
                seconds = time.perf_counter() - started
                expected = (lr_patch.width * dataset.scale, lr_patch.height * dataset.scale)
                if output.size != expected:
                    raise ValueError(
                        f"upscaler {method!r} returned {output.size} for a {lr_patch.size} input "
                        f"at x{dataset.scale}; expected {expected}"
                    )
                output = output.convert("RGB")
                values: dict[str, float] = {}
                if hr_patch is not None:
                    if "psnr" in metrics:
                        values["psnr"] = psnr(output, hr_patch, crop_border=dataset.scale)
                    if "ssim" in metrics:
                        values["ssim"] = ssim(output, hr_patch, crop_border=dataset.scale)
                for metric_name, metric in learned.items():
                    if metric.needs_reference and hr_patch is None:
                        continue
                    values[metric_name] = metric(output, hr_patch)
                if save_images:
                    target = out_dir / "images" / dataset.name / method / f"{pair.name}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    output.save(target)
                result = ImageResult(
                    dataset=dataset.name,
                    method=method,
                    image=pair.name,
                    metrics=values,
                    seconds=seconds,
                )
                per_method[method].append(result)
                results.append(result)
        # 3. Means per method, then the paper's numbers for the same benchmark.
        for method, method_results in per_method.items():
            means: dict[str, float | None] = {
                m: _mean(r.metrics[m] for r in method_results if m in r.metrics)
                for m in ALL_METRICS
            }
            rows.append(
                SummaryRow(
                    dataset=dataset.name,
                    benchmark=dataset.benchmark,
                    method=method,
                    source="ours",
                    images=len(method_results),
                    metrics=means,
                    seconds_per_image=_mean(r.seconds for r in method_results),
                )
            )
        rows += paper_rows(dataset.benchmark, dataset.name, paper)

    # 4. Tables.
    settings: dict[str, object] = {
        "scale": scale,
        "lr_crop": lr_crop,
        "lr_only_crop": lr_only_crop,
        "methods": list(methods),
        "datasets": [d.name for d in sets],
    }
    return write_tables(out_dir, rows, results, status, settings)


# ---------------------------------------------------------------------------------------------
# Synthetic test sets
# ---------------------------------------------------------------------------------------------


def make_degraded_patch_set(
    hr_dir: Path,
    out_dir: Path,
    *,
    count: int = 3000,
    patch: int = 512,
    seed: int = 0,
    config: RealESRGANDegradationConfig | None = None,
) -> Path:
    """Build a StableSR-style ``gt/`` + ``lq/`` patch set from HR images (e.g. DIV2K-val).

    The paper's DIV2K-Val set is 3,000 ``patch``-pixel HR crops degraded by Real-ESRGAN to
    ``patch / scale`` LR patches (DESIGN 1.5). Crops are drawn uniformly over the images (image
    chosen round-robin, position from ``seed``); each patch is degraded with its own seed.
    """
    sources = _images_in(Path(hr_dir))
    if not sources:
        raise ValueError(f"no HR images in {hr_dir}")
    config = config or RealESRGANDegradationConfig()
    if patch % config.scale:
        raise ValueError(f"patch {patch} must be a multiple of the scale {config.scale}")
    out_dir = Path(out_dir)
    (out_dir / "gt").mkdir(parents=True, exist_ok=True)
    (out_dir / "lq").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        with Image.open(sources[index % len(sources)]) as source:
            hr = source.convert("RGB")
        if hr.width < patch or hr.height < patch:
            raise ValueError(f"{sources[index % len(sources)]} is smaller than {patch} px")
        left = int(rng.integers(0, hr.width - patch + 1))
        top = int(rng.integers(0, hr.height - patch + 1))
        crop = hr.crop((left, top, left + patch, top + patch))
        crop.save(out_dir / "gt" / f"{index:07d}.png")
        degrade_image(crop, seed=seed * 1_000_003 + index, config=config).save(
            out_dir / "lq" / f"{index:07d}.png"
        )
    return out_dir
