"""Real-ESRGAN as an :class:`~model.upscalers.base.Upscaler`: the published weights, or your own.

Real-ESRGAN (Wang et al. 2021) networks magnify by a fixed factor (x4 for every model we serve).
A smaller requested scale is reached the way the project itself does it:

- ``realesrgan-x4plus`` / ``-anime`` at x2 (or x3): the x4 result downscaled with Lanczos, the
  practice of Real-ESRGAN's ``inference_realesrgan.py --outscale``;
- ``realesr-animevideov3`` at x2 / x3: the final resize its published x2 / x3 graphs apply to the
  same x4 network (read from those graphs at conversion: bicubic 0.5 and 0.75).

Inference is tiled over the input (:mod:`model.upscalers.realesrgan.tiling`) so memory stays bounded
whatever the image size; progress is one ``("upscale", done_tiles, total_tiles)`` report per
tile, plus one at 0 before the first.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.grounding.drm import RRDBNet, infer_rrdbnet_config, load_published_state_dict
from model.grounding.modules import device_of, dtype_of, frozen
from model.upscalers.base import ModelCard, ProgressCallback, UpscaleOptions, UpscaleResult

from .catalogue import (
    PACKAGE,
    SuperResolutionNet,
    ensure_converted,
    load_network,
    package_version,
    post_resizes,
    published,
    read_provenance,
)
from .ncnn import PostResize
from .srvgg import SRVGGNetCompact, infer_srvgg_config
from .tiling import upscale_tiled

RRDBNET_OVERLAP = 32
"""Input pixels of context around each RRDBNet tile. Its 351 convolutions reach hundreds of pixels
and the trained x4plus weights do use far context, so no affordable context makes tiles exact.
Measured on a photo with 56-px tiles, the largest seam error against one pass was 50 grey levels
with 8 px of context (Real-ESRGAN's own tiling pads 10), 25 with 24, 13 with 32 (mean 0.23) and
6 with 48. 32 costs (128 + 64)² / 128² = 2.25x the work of context-free 128-px tiles, 48 3.1x."""
SRVGG_MARGIN = 2
"""SRVGGNetCompact tiles get its exact receptive radius (one pixel per conv) plus this: tiles are
then exact, bicubic post-resize included."""
MIN_TILE = 32
"""Smallest tile side in input pixels: below this the context dominates the work."""
SERVABLE_SCALES = (2, 3, 4)


def default_overlap(net: SuperResolutionNet) -> int:
    if isinstance(net, SRVGGNetCompact):
        return int(net.receptive_radius) + SRVGG_MARGIN
    return RRDBNET_OVERLAP


def describe(net: SuperResolutionNet) -> str:
    """The architecture in a few words, from the module's own config."""
    config: Mapping[str, Any] = net.config
    if isinstance(net, RRDBNet):
        return (
            f"RRDBNet {config['num_features']} features, {config['num_blocks']} blocks, growth "
            f"{config['growth_channels']}, x{config['scale']}"
        )
    return (
        f"SRVGGNetCompact {config['num_features']} features, {config['num_convs']} convs, "
        f"{config['activation']}, x{config['upscale']}"
    )


class RealESRGANUpscaler:
    """An RRDBNet or SRVGGNetCompact served at any scale from 2 up to its own magnification.

    ``post_resizes`` maps a scale below the network's to the resize that gets there (default:
    Lanczos on the uint8 result, Real-ESRGAN's ``--outscale``). ``overlap`` is the context around
    each tile in input pixels (default: :func:`default_overlap`).
    """

    def __init__(
        self,
        net: SuperResolutionNet,
        *,
        name: str,
        weights: str,
        source: str = "",
        licence: str = "",
        description: str = "",
        version: str = "1",
        scales: tuple[int, ...] | None = None,
        post_resizes: Mapping[int, PostResize] | None = None,
        overlap: int | None = None,
    ) -> None:
        self.net = frozen(net)
        self.net_scale = int(net.scale_factor)
        possible = tuple(s for s in SERVABLE_SCALES if s <= self.net_scale)
        self.scales = tuple(s for s in (scales or possible) if s in possible)
        if not self.scales:
            raise ValueError(f"{name}: a x{self.net_scale} network serves none of {scales}")
        self.post_resizes = dict(post_resizes or {})
        self.overlap = default_overlap(net) if overlap is None else overlap
        self._card = ModelCard(
            name=name,
            version=version,
            configuration=describe(net),
            weights=weights,
            trained=True,
            device=str(device_of(net)),
            dtype=str(dtype_of(net)).removeprefix("torch."),
            description=description,
            source=source,
            licence=licence,
            scales=self.scales,
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_catalogue(
        cls,
        name: str,
        *,
        cache_root: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        models_dir: str | Path | None = None,
    ) -> RealESRGANUpscaler:
        """A published model by name (``realesrgan-x4plus``, ``realesrgan-x4plus-anime``,
        ``realesr-animevideov3``), converted once into ``<cache_root>/<name>/``."""
        model = published(name)
        folder = ensure_converted(name, cache_root, models_dir=models_dir)
        provenance = read_provenance(folder)
        return cls(
            load_network(folder, device=device, dtype=dtype),
            name=name,
            weights=(
                f"the official Real-ESRGAN {name} release, shipped in {PACKAGE} "
                f"{package_version()} and converted from ncnn ({model.licence})"
            ),
            source=model.source,
            licence=model.licence,
            description=model.description,
            version=package_version(),
            scales=model.scales,
            post_resizes=post_resizes(provenance),
        )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        name: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> RealESRGANUpscaler:
        """A folder written by ``save_pretrained`` (ours from the catalogue, or your own)."""
        folder = Path(folder)
        provenance = read_provenance(folder)
        name = name or str(provenance.get("name") or folder.name)
        source = str(provenance.get("source") or "your converted folder")
        licence = str(provenance.get("licence", ""))
        return cls(
            load_network(folder, device=device, dtype=dtype),
            name=name,
            # The folder's name, never its path: the card is shown to every client.
            weights=f"{folder.name} ({source}{'; licence ' + licence if licence else ''})",
            source=source,
            licence=licence,
            description=str(provenance.get("description", "")),
            version=str(provenance.get("package_version", "custom")),
            post_resizes=post_resizes(provenance),
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> RealESRGANUpscaler:
        """A published-layout ``.pth`` / ``.safetensors``: ``RealESRGAN_x4plus.pth``
        (``params_ema``), RealESRNet, BSRNet (legacy ESRGAN names), ``realesr-animevideov3.pth``
        (``params``). The architecture and its sizes are read off the tensors."""
        path = Path(path)
        net = network_from_checkpoint(path)
        return cls(
            frozen(net, device, dtype),
            name=name or path.stem,
            weights=f"your checkpoint {path.name}",
            source="your own checkpoint",
            version="custom",
        )

    @classmethod
    def from_weights(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> RealESRGANUpscaler:
        """Your own weights: a converted folder or a checkpoint file."""
        if Path(path).is_dir():
            return cls.from_pretrained(path, name=name, device=device, dtype=dtype)
        return cls.from_checkpoint(path, name=name, device=device, dtype=dtype)

    # ------------------------------------------------------------------ Upscaler

    @property
    def card(self) -> ModelCard:
        return self._card

    def warm_up(self) -> None:
        self.upscale(Image.new("RGB", (16, 16), (127, 127, 127)), UpscaleOptions(scale=2))

    def tile_for(self, options: UpscaleOptions) -> int:
        """Tile side in input pixels. ``options.tile_size`` is read at the network's own
        magnification, since the x4 activations are what a tile's memory is spent on."""
        return max(MIN_TILE, options.tile_size // self.net_scale)

    def resize_for(self, scale: int) -> PostResize | None:
        if scale == self.net_scale:
            return None
        return self.post_resizes.get(scale, PostResize("lanczos", scale / self.net_scale))

    def upscale(
        self,
        image: Image.Image,
        options: UpscaleOptions,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> UpscaleResult:
        scale = options.scale
        if scale not in self.scales:
            raise ValueError(f"{self._card.name} serves scales {self.scales}, not x{scale}")
        started = time.perf_counter()
        tensor = image_to_tensor(image).to(device_of(self.net), dtype_of(self.net))
        counted: list[int] = []

        def on_tile(done: int, total: int) -> None:
            counted[:] = [total]
            if on_progress is not None:
                on_progress("upscale", done, total)

        resize = self.resize_for(scale)
        output = upscale_tiled(
            self.net,
            tensor,
            scale=scale,
            tile=self.tile_for(options),
            overlap=self.overlap,
            resize=resize,
            on_tile=on_tile,
        )
        elapsed = time.perf_counter() - started
        details: dict[str, Any] = {
            "tiles": counted[0],
            "network_scale": self.net_scale,
            "resize": None if resize is None else resize.mode,
        }
        return UpscaleResult(
            image=Image.fromarray(output),
            timings={"upscale": elapsed, "total": elapsed},
            details=details,
        )


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> ``(1, 3, H, W)`` float32 in [0, 1], what Real-ESRGAN's nets were trained on."""
    array = np.array(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def network_from_checkpoint(path: Path) -> SuperResolutionNet:
    """RRDBNet (``conv_first``...) or SRVGGNetCompact (``body.0``...) from a published file."""
    state = load_published_state_dict(path)
    net: SuperResolutionNet
    if "conv_first.weight" in state:
        net = RRDBNet(**infer_rrdbnet_config(state))
    elif "body.0.weight" in state:
        net = SRVGGNetCompact(**infer_srvgg_config(state))
    else:
        sample = sorted(state)[:4]
        raise ValueError(f"{path.name}: neither RRDBNet nor SRVGGNetCompact keys ({sample}...)")
    net.load_state_dict(state, strict=True)
    return net
