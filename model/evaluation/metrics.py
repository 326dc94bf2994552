"""Image-quality metrics for the evaluation protocol (DESIGN 1.5).

PSNR and SSIM follow the convention of the super-resolution field (BasicSR, and the MATLAB code it
reproduces): computed on the Y channel of ITU-R BT.601 YCbCr as MATLAB's ``rgb2ycbcr`` gives it
(``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` for 8-bit R, G, B; not rounded), after
cropping ``crop_border`` pixels (the scale) from every side. SSIM is Wang, Bovik, Sheikh,
Simoncelli, "Image Quality Assessment: From Error Visibility to Structural Similarity", IEEE TIP
2004: an 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, averaged over the
valid part of the map.

Learned metrics (CLIP-IQA, MUSIQ, MANIQA, LPIPS) need weights that no machine of this project can
download. :func:`load_learned_metrics` builds those it can from local files the caller names and
reports every other one as skipped, with the reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

logger = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray
"""An RGB ``PIL.Image`` or an ``(H, W, 3)`` / ``(H, W)`` array of 8-bit values (any dtype)."""

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_PEAK = 255.0


# ---------------------------------------------------------------------------------------------
# Colour conversion and input handling
# ---------------------------------------------------------------------------------------------


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma as MATLAB's ``rgb2ycbcr``: ``(..., 3, H, W)`` RGB in [0, 255] -> [16, 235]."""
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=rgb.dtype, device=rgb.device)
    return (rgb * weights.view(3, 1, 1)).sum(dim=-3) / 255.0 + 16.0


def _as_chw(image: ImageLike) -> torch.Tensor:
    """``(C, H, W)`` float64 in [0, 255] from a PIL image or an HWC / HW array."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB") if image.mode not in ("RGB", "L") else image)
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) or (H, W) image, got shape {array.shape}")
    return torch.from_numpy(array.astype(np.float64)).permute(2, 0, 1)


def _prepare(
    image: ImageLike, reference: ImageLike, crop_border: int, y_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_chw(image), _as_chw(reference)
    if a.shape != b.shape:
        raise ValueError(
            f"image and reference differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if 2 * crop_border >= min(a.shape[-2:]):
        raise ValueError(
            f"crop_border {crop_border} leaves nothing of a {tuple(a.shape[-2:])} image"
        )
    if crop_border:
        a = a[:, crop_border:-crop_border, crop_border:-crop_border]
        b = b[:, crop_border:-crop_border, crop_border:-crop_border]
    if y_channel and a.shape[0] == 3:
        a, b = rgb_to_y(a)[None], rgb_to_y(b)[None]
    return a, b


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------------------------


def psnr_tensor(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB over all but the first dimension of ``(N, ...)`` tensors in [0, 255].

    Identical inputs give ``inf``.
    """
    diff = (image.to(torch.float64) - reference.to(torch.float64)).flatten(1)
    mse = diff.pow(2).mean(dim=1)
    return 10.0 * torch.log10(_PEAK**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian window ``(size, size)`` float64 (Wang et al. 2004: 11, 1.5)."""
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(axis**2) / (2 * sigma**2))
    profile = profile / profile.sum()
    return torch.outer(profile, profile)


def ssim_map(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM map of ``(N, C, H, W)`` tensors in [0, 255] over the valid window positions (Eq. 13)."""
    x = image.to(torch.float64)
    y = reference.to(torch.float64)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} pixels a side")
    channels = x.shape[1]
    window = gaussian_window().to(x.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1 = (_SSIM_K1 * _PEAK) ** 2
    c2 = (_SSIM_K2 * _PEAK) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return numerator / denominator


def psnr(
    image: ImageLike, reference: ImageLike, *, crop_border: int, y_channel: bool = True
) -> float:
    """PSNR (dB) of 8-bit images, on the Y channel by default, ``crop_border`` pixels cropped.

    The SR field crops a border equal to the scale; identical images give ``inf``.
    """
    a, b = _prepare(image, reference, crop_border, y_channel)
    return float(psnr_tensor(a[None], b[None])[0])


def ssim(
    image: ImageLike, reference: ImageLike, *, crop_border: int, y_channel: bool = True
) -> float:
    """SSIM (Wang et al. 2004) of 8-bit images; on RGB, the mean of the per-channel SSIMs."""
    a, b = _prepare(image, reference, crop_border, y_channel)
    return float(ssim_map(a[None], b[None]).mean())


def psnr_ssim_y_batch(
    images: torch.Tensor, references: torch.Tensor, *, crop_border: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Y-channel PSNR and SSIM of ``(B, 3, H, W)`` RGB tensors in [0, 1].

    Inputs are quantised to 8-bit levels first, as saved images would be, so the numbers equal
    those of :func:`psnr` / :func:`ssim` on the written files (for validation during training).
    """
    if images.shape != references.shape or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected two (B, 3, H, W) tensors, got {images.shape}, {references.shape}"
        )
    a = torch.round(images.detach().to(torch.float64).clamp(0, 1) * 255.0)
    b = torch.round(references.detach().to(torch.float64).clamp(0, 1) * 255.0)
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    ya, yb = rgb_to_y(a)[:, None], rgb_to_y(b)[:, None]
    return psnr_tensor(ya, yb), ssim_map(ya, yb).flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Learned metrics
# ---------------------------------------------------------------------------------------------

LearnedMetricName = Literal["clipiqa", "musiq", "maniqa", "lpips"]
LEARNED_METRICS: tuple[LearnedMetricName, ...] = ("clipiqa", "musiq", "maniqa", "lpips")


class LearnedMetric(Protocol):
    """A metric backed by a network: no-reference (``reference`` ignored) or full-reference."""

    name: str
    higher_is_better: bool
    needs_reference: bool

    def __call__(self, image: Image.Image, reference: Image.Image | None = None) -> float: ...


@dataclass(frozen=True, kw_only=True)
class MetricStatus:
    """Whether a learned metric could be built, and if not, why (shown to the user)."""

    name: str
    available: bool
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class LearnedMetricPaths:
    """Local weight files for the learned metrics; ``None`` means not available here."""

    clip_model: Path | None = None
    """A transformers ``CLIPModel`` folder (config, weights, tokenizer) for CLIP-IQA."""
    lpips_backbone: Path | None = None
    """AlexNet or VGG-16 ``features`` weights in torchvision's key layout (.pth / .safetensors)."""
    lpips_linear: Path | None = None
    """LPIPS v0.1 linear-layer weights (keys ``lin0.model.1.weight`` ... ``lin4...``)."""
    lpips_net: Literal["alex", "vgg"] = "alex"
    musiq: Path | None = None
    maniqa: Path | None = None


def _to_unit_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


# (out_channels, kernel, stride, padding) per conv, "M" a 3x3/2 (alex) or 2x2/2 (vgg) max-pool;
# the taps are the ReLU outputs LPIPS compares (Zhang et al. 2018, Sec. 3).
_ALEX_LAYERS: tuple[tuple[int, int, int, int] | str, ...] = (
    (64, 11, 4, 2),
    "M",
    (192, 5, 1, 2),
    "M",
    (384, 3, 1, 1),
    (256, 3, 1, 1),
    (256, 3, 1, 1),
)
_VGG16_LAYERS: tuple[tuple[int, int, int, int] | str, ...] = (
    (64, 3, 1, 1),
    (64, 3, 1, 1),
    "M",
    (128, 3, 1, 1),
    (128, 3, 1, 1),
    "M",
    (256, 3, 1, 1),
    (256, 3, 1, 1),
    (256, 3, 1, 1),
    "M",
    (512, 3, 1, 1),
    (512, 3, 1, 1),
    (512, 3, 1, 1),
    "M",
    (512, 3, 1, 1),
    (512, 3, 1, 1),
    (512, 3, 1, 1),
)
_LPIPS_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
# LPIPS's fixed input normalisation for inputs in [-1, 1] (its "ScalingLayer").
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class _Features(torch.nn.Module):
    """AlexNet / VGG-16 convolutional trunk laid out as torchvision's ``features`` Sequential."""

    def __init__(self, net: Literal["alex", "vgg"]) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        relu_widths: dict[int, int] = {}
        in_channels = 3
        spec = _ALEX_LAYERS if net == "alex" else _VGG16_LAYERS
        pool = (3, 2) if net == "alex" else (2, 2)
        for item in spec:
            if isinstance(item, str):
                layers.append(torch.nn.MaxPool2d(kernel_size=pool[0], stride=pool[1]))
                continue
            out_channels, kernel, stride, padding = item
            layers.append(torch.nn.Conv2d(in_channels, out_channels, kernel, stride, padding))
            layers.append(torch.nn.ReLU(inplace=False))
            relu_widths[len(layers) - 1] = out_channels
            in_channels = out_channels
        self.features = torch.nn.Sequential(*layers)
        self.taps = _LPIPS_TAPS[net]
        # The ReLU at each tap follows the conv whose width the linear layer weighs.
        self.channels = tuple(relu_widths[tap] for tap in self.taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs


class LPIPSNetwork(torch.nn.Module):
    """LPIPS distance (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
    Perceptual Metric", CVPR 2018, Eq. 1): unit-normalised deep features, squared differences
    weighted per channel by the learned linear layers, averaged spatially, summed over layers.
    """

    def __init__(self, net: Literal["alex", "vgg"] = "alex") -> None:
        super().__init__()
        self.net = _Features(net)
        self.lins = torch.nn.ModuleList(
            torch.nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in self.net.channels
        )
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance of ``(B, 3, H, W)`` tensors in [0, 1]."""
        shift, scale = self.get_buffer("shift"), self.get_buffer("scale")
        fx = self.net((x * 2 - 1 - shift) / scale)
        fy = self.net((y * 2 - 1 - shift) / scale)
        total = torch.zeros(x.shape[0], device=x.device)
        for a, b, lin in zip(fx, fy, self.lins, strict=True):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b) ** 2).mean(dim=(1, 2, 3))
        return total


class LPIPS:
    """The LPIPS metric on PIL images (lower is better), from local weight files."""

    name = "lpips"
    higher_is_better = False
    needs_reference = True

    def __init__(self, network: LPIPSNetwork, *, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()

    @classmethod
    def from_files(
        cls,
        backbone: Path,
        linear: Path,
        *,
        net: Literal["alex", "vgg"] = "alex",
        device: torch.device | str = "cpu",
    ) -> LPIPS:
        """Load the trunk (torchvision layout) and the LPIPS v0.1 linear layers from local files."""
        network = LPIPSNetwork(net)
        trunk = {k: v for k, v in _load_state_dict(backbone).items() if k.startswith("features.")}
        network.net.load_state_dict(trunk, strict=True)
        lin_state = _load_state_dict(linear)
        for index in range(len(network.lins)):
            key = f"lin{index}.model.1.weight"
            if key not in lin_state:
                raise ValueError(f"{linear} lacks {key}: not LPIPS v0.1 linear weights")
            network.lins.load_state_dict({f"{index}.weight": lin_state[key]}, strict=False)
        return cls(network, device=device)

    @torch.no_grad()
    def __call__(self, image: Image.Image, reference: Image.Image | None = None) -> float:
        if reference is None:
            raise ValueError("LPIPS is a full-reference metric: pass the reference image")
        x = _to_unit_tensor(image, self.device)
        y = _to_unit_tensor(reference, self.device)
        return float(self.network(x, y)[0])


_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPIQA:
    """CLIP-IQA (Wang, Chan, Loy, "Exploring CLIP for Assessing the Look and Feel of Images",
    AAAI 2023, Sec. 3): softmax over the image's similarities to the antonym prompts
    "Good photo." / "Bad photo."; the score is the probability of "Good photo.".

    Built on a transformers ``CLIPModel`` from a local folder. The published CLIP-IQA (and the
    paper's table) uses OpenAI's ResNet-50 CLIP without positional embedding, which transformers
    does not provide; with a ViT CLIP the scores follow the same recipe but are not numerically
    comparable to the paper's column.
    """

    name = "clipiqa"
    higher_is_better = True
    needs_reference = False

    def __init__(
        self,
        folder: Path,
        *,
        device: torch.device | str = "cpu",
        prompts: tuple[str, str] = ("Good photo.", "Bad photo."),
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.device = torch.device(device)
        model = CLIPModel.from_pretrained(folder)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
        self.input_ids = tokens["input_ids"].to(self.device)
        self.attention_mask = tokens["attention_mask"].to(self.device)
        self.image_size = int(self.model.config.vision_config.image_size)
        mean, std = _OPENAI_CLIP_MEAN, _OPENAI_CLIP_STD
        preprocessor = Path(folder) / "preprocessor_config.json"
        if preprocessor.is_file():
            config = json.loads(preprocessor.read_text())
            mean = tuple(config.get("image_mean", mean))
            std = tuple(config.get("image_std", std))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """Shorter side to the model's input size (bicubic), centre crop, CLIP normalisation."""
        width, height = image.size
        ratio = self.image_size / min(width, height)
        size = (
            max(self.image_size, round(width * ratio)),
            max(self.image_size, round(height * ratio)),
        )
        resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        left = (size[0] - self.image_size) // 2
        top = (size[1] - self.image_size) // 2
        cropped = resized.crop((left, top, left + self.image_size, top + self.image_size))
        return (_to_unit_tensor(cropped, self.device) - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, image: Image.Image, reference: Image.Image | None = None) -> float:
        output = self.model(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            pixel_values=self._pixels(image),
        )
        probabilities = output.logits_per_image.softmax(dim=-1)
        return float(probabilities[0, 0])


_UNIMPLEMENTED = {
    "musiq": "MUSIQ (Ke et al. 2021) needs its multi-scale image transformer and released "
    "weights; this package has no implementation of that architecture",
    "maniqa": "MANIQA (Yang et al. 2022) needs its ViT-B/8 + transposed-attention network and "
    "released weights; this package has no implementation of that architecture",
}


def load_learned_metrics(
    paths: LearnedMetricPaths,
    *,
    names: tuple[LearnedMetricName, ...] = LEARNED_METRICS,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, LearnedMetric], list[MetricStatus]]:
    """Build every requested learned metric whose weights are present locally.

    Returns the usable metrics by name and one :class:`MetricStatus` per requested name; a
    metric that cannot be built is skipped (logged at warning level) with the reason.
    """
    builders: dict[str, Callable[[], LearnedMetric]] = {}
    missing: dict[str, str] = {}

    if paths.clip_model is not None and Path(paths.clip_model).is_dir():
        folder = Path(paths.clip_model)
        builders["clipiqa"] = lambda: CLIPIQA(folder, device=device)
    else:
        missing["clipiqa"] = (
            "no local CLIP model folder given (LearnedMetricPaths.clip_model)"
            if paths.clip_model is None
            else f"CLIP model folder {paths.clip_model} does not exist"
        )
    lpips_files = (paths.lpips_backbone, paths.lpips_linear)
    if all(p is not None and Path(p).is_file() for p in lpips_files):
        backbone, linear = Path(lpips_files[0]), Path(lpips_files[1])  # type: ignore[arg-type]
        builders["lpips"] = lambda: LPIPS.from_files(
            backbone, linear, net=paths.lpips_net, device=device
        )
    else:
        missing["lpips"] = (
            f"LPIPS needs the {paths.lpips_net} backbone weights and the LPIPS linear weights "
            f"as local files; given backbone={paths.lpips_backbone}, linear={paths.lpips_linear}"
        )
    for name in ("musiq", "maniqa"):
        given = getattr(paths, name)
        suffix = f" (weights given at {given} cannot be used)" if given is not None else ""
        missing[name] = _UNIMPLEMENTED[name] + suffix

    metrics: dict[str, LearnedMetric] = {}
    statuses: list[MetricStatus] = []
    for name in names:
        if name in builders:
            try:
                metrics[name] = builders[name]()
            except (OSError, ValueError, RuntimeError, KeyError) as error:
                missing[name] = f"could not load its weights: {error}"
            else:
                statuses.append(MetricStatus(name=name, available=True))
                continue
        if name not in missing:
            raise ValueError(f"unknown learned metric {name!r}; known: {LEARNED_METRICS}")
        logger.warning("skipping %s: %s", name, missing[name])
        statuses.append(MetricStatus(name=name, available=False, reason=missing[name]))
    return metrics, statuses
