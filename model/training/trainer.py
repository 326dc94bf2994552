"""Training SpaSemSR's trainable blocks (arXiv 2603.14112, Eq. 11-12; DESIGN 1.1 and 1.4).

``L = ||ε - ε_θ(z_t, t, I_LR, x_deg, {x_obj, x_spa})||² + λ · L_SemDeg`` with one λ, as Eq. 12
writes it (``lambda_semdeg``, 0.05 [I]: XPSR's weight, the paper gives none). ``L_SemDeg`` is the
sum, in equal parts, of four L1 terms, each towards a frozen target computed on the HR image (the
dashed arrows of Fig. 2b-c) [F]/[I]:

* ``image``: ``ImageEncoder(LR)`` towards the scaled ``VAE(HR)`` latent ("VAE degradation");
* ``semantic``: ``SemanticEncoder(LR)`` towards frozen SAM on ``HR`` ("semantic degradation"),
  both at latent resolution. The frozen SAM is the SAM the semantic encoder started from, kept
  in the pipeline folder as ``sam_target/`` (:func:`load_sam_target`), never a copy of the
  encoder being trained: fine-tuning a trained folder must not make the encoder its own target;
* ``controlnet_image`` and ``controlnet_semantic``: the ControlNet's spatial-semantic embeddings
  (one map per resolution level, fed the LR guidance) through light trained 1x1 projection heads
  (:class:`SemanticDegradationHeads`, as XPSR ties its ControlNet features to clean-image
  features [I]) towards the same ``VAE(HR)`` and ``SAM(HR)``, average-pooled to each level.
  Their targets lie outside the ControlNet, so a ControlNet that ignores its guidance ``f`` gains
  nothing. (A term regressing the ControlNet on LR guidance onto itself on HR guidance, this
  module's former form, is exactly 0 for such a ControlNet: it rewards ignoring the image
  branch.)

Trained [F]: image encoder, semantic encoder, Spatial-Semantic ControlNet, the UNet additions,
and (training only) the projection heads, saved as ``semdeg_heads/`` beside the pipeline's
blocks. Frozen, without gradients or optimiser state: UNet, VAE, text encoder, the SAM target
and the grounder.

Prompts: tags and boxes come from the HR images [P], grounded once per image by a
:class:`model.pipeline.prompt.Grounder` and cached as JSON in the output folder. The
degradation-aware caption cannot come from there (an HR image is clean, the encoders see a degraded
LR): it is measured on every synthesised LR, per sample, after the degradation
(:func:`measure_degradations`, batched on the training device; the grounder's noise, blur and JPEG
estimates) and worded by the grounder's template around the HR image's scene words, as the grounder
captions an LR at inference.

The loop runs on ``accelerate.Accelerator`` (DDP across GPUs, mixed precision, gradient
accumulation, ``save_state`` / ``load_state`` for resume); every checkpoint also writes a
pipeline folder (``save_pretrained``, marked trained) that :class:`SpaSemSRPipeline` loads.

Data set layout: ``<data_dir>/hr/**/*.{png,jpg,jpeg,webp,bmp}`` (any nesting; a folder without
``hr/`` is read as the HR folder itself). LR images are made on the fly, on the training device,
by the Real-ESRGAN second-order degradation.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.optimization import get_constant_schedule_with_warmup
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import SamVisionModel

from model.blocks.controlnet import SpatialSemanticControlNet
from model.blocks.encoders import ImageEncoder, semantic_features
from model.blocks.text import TextConditioner, default_prompt
from model.blocks.unet_attention import SpaSemSRUNetAttention, unet_with_control
from model.grounding.degradation import (
    JPEG_BLOCK,
    MAD_TO_SIGMA,
    CaptionThresholds,
    DegradationEstimates,
    compose_caption,
    scene_phrase,
)
from model.pipeline.diffusion import SpaSemSRPipeline
from model.pipeline.prompt import Box, GroundedPrompt, Grounder
from model.pipeline.tiling import boxes_for_tile
from model.training.config import TrainingConfig
from model.training.degradations import RealESRGANDegradation, RealESRGANDegradationConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_CACHE = "prompts.json"
CHECKPOINTS = "checkpoints"
PIPELINE = "pipeline"
TRAINED_BLOCKS = ("image_encoder", "semantic_encoder", "controlnet", "unet_attention")
SAM_TARGET = "sam_target"
"""Pipeline sub-folder of the frozen SAM (``SamVisionModel``) the semantic constraint aims at;
not a pipeline component (``model_index.json`` does not list it), so inference never loads it."""
SEMDEG_HEADS = "semdeg_heads"
"""Pipeline sub-folder of the trained projection heads of the ControlNet terms (training only)."""
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingReport:
    """What a run did: ``losses`` holds one dict per optimiser step of this run (``total``,
    ``diffusion``, and with ``lambda_semdeg > 0`` ``semdeg`` and its terms ``image``,
    ``semantic``, ``controlnet_image``, ``controlnet_semantic``)."""

    output_dir: Path
    pipeline_dir: Path
    first_step: int
    global_step: int
    losses: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each optimiser step of this run (checkpoint writing included)."""
    seconds: float = 0.0
    grounded_images: int = 0
    """HR images the grounder ran on in this run (0 when every prompt came from the cache)."""

    @property
    def steps_per_second(self) -> float:
        steps = self.global_step - self.first_step
        return steps / self.seconds if self.seconds > 0 else 0.0


# -- data --------------------------------------------------------------------------------------


def find_hr_images(data_dir: Path) -> list[Path]:
    """Every image under ``<data_dir>/hr`` (or ``data_dir`` itself when it has no ``hr/``),
    sorted."""
    root = data_dir / "hr" if (data_dir / "hr").is_dir() else data_dir
    if not root.is_dir():
        raise ValueError(f"no data set folder at {data_dir}")
    files = sorted(
        path
        for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"no HR images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def _prompt_from_json(data: dict[str, Any]) -> GroundedPrompt:
    return GroundedPrompt(
        tags=tuple(str(tag) for tag in data.get("tags", [])),
        boxes=tuple(
            (float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in data.get("boxes", [])
        ),
        caption=str(data.get("caption", "")),
        estimates={str(k): float(v) for k, v in data.get("estimates", {}).items()},
    )


def _hr_grounder(grounder: Grounder) -> Grounder:
    """HR images are clean: a SpaSemSR grounder skips its degradation-removal model on them, and
    its SAM masks, which no SpaSemSR block reads."""
    try:
        from model.grounding import SpaSemSRGrounder
    except ImportError:  # the grounding package is optional for training
        return grounder
    if isinstance(grounder, SpaSemSRGrounder) and (
        grounder.drm is not None or grounder.config.masks
    ):
        return SpaSemSRGrounder(
            drm=None,
            tagger=grounder.tagger,
            detector=grounder.detector,
            captioner=grounder.captioner,
            config=replace(grounder.config, masks=False),
        )
    return grounder


def caption_thresholds_of(grounder: Grounder | None) -> CaptionThresholds:
    """Where the grounder's captions start naming a degradation (its defaults without one), so
    the training captions are worded as the served grounder words them."""
    config = getattr(grounder, "config", None)
    thresholds = getattr(config, "caption", None)
    return thresholds if isinstance(thresholds, CaptionThresholds) else CaptionThresholds()


_CAPTION_SCENE = re.compile(
    r"^An? (?:[\w-]+, )*(?:[\w-]+ )?image of (?P<scene>.+?)\. The image (?:shows|exhibits) "
)


def caption_scene(caption: str, tags: Sequence[str]) -> str:
    """The scene words of a grounder's caption (``"A clean image of <scene>. The image ..."``),
    so that the caption of an LR can be worded around the same scene; for a caption of another
    form (the generic default prompt, a hand-written one) the scene words of the tags."""
    match = _CAPTION_SCENE.match(caption.strip())
    return match.group("scene") if match else scene_phrase(tags)


def build_prompt_cache(
    files: Sequence[Path],
    root: Path,
    cache_file: Path,
    grounder: Grounder | None,
) -> tuple[dict[str, GroundedPrompt], int]:
    """Tags, boxes and caption of every HR image, computed once and kept in ``cache_file``.

    Entries are keyed by the path relative to ``root`` and remember the file's size and
    modification time, so an edited image is grounded again. Without a grounder an image gets
    :func:`model.blocks.text.default_prompt` (no tags, a generic caption). Returns the prompts and
    how many images were grounded now.
    """
    cached: dict[str, Any] = {}
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text()).get("images", {})
    hr_grounder = _hr_grounder(grounder) if grounder is not None else None
    prompts: dict[str, GroundedPrompt] = {}
    entries: dict[str, Any] = {}
    grounded = 0
    for path in tqdm(files, desc="grounding HR images", leave=False, disable=len(files) < 16):
        key = path.relative_to(root).as_posix()
        stat = path.stat()
        entry = cached.get(key)
        if (
            entry is None
            or entry.get("size") != stat.st_size
            or entry.get("mtime_ns") != (stat.st_mtime_ns)
        ):
            if hr_grounder is not None:
                with Image.open(path) as image:
                    prompt = hr_grounder.ground(image.convert("RGB")).prompt
                source = "grounder"
            else:
                prompt, source = default_prompt(), "default"
            grounded += 1
            entry = {
                **prompt.to_json(),
                "source": source,
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
        entries[key] = entry
        prompts[key] = _prompt_from_json(entry)
    if grounded or set(entries) != set(cached):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_file.with_suffix(".json.tmp")
        staging.write_text(json.dumps({"version": 1, "images": entries}, indent=1) + "\n")
        staging.replace(cache_file)
        logger.info("grounded %d HR images; prompt cache at %s", grounded, cache_file)
    return prompts, grounded


class HRPatchDataset(Dataset[dict[str, Any]]):
    """Random ``resolution²`` HR patches in ``[0, 1]`` with the prompt re-projected into the patch.

    Images whose shorter side is below ``resolution`` are first resized up (bicubic). A random
    horizontal flip mirrors the boxes too. Random draws use torch's global generator (seeded by
    the trainer; per-worker seeds come from the data loader).
    """

    def __init__(
        self,
        files: Sequence[Path],
        root: Path,
        prompts: dict[str, GroundedPrompt],
        *,
        resolution: int,
        horizontal_flip: bool = True,
    ) -> None:
        self.files = list(files)
        self.keys = [path.relative_to(root).as_posix() for path in self.files]
        self.prompts = prompts
        self.scenes = {key: caption_scene(p.caption, p.tags) for key, p in prompts.items()}
        self.resolution = resolution
        self.horizontal_flip = horizontal_flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        size = self.resolution
        with Image.open(self.files[index]) as opened:
            image = opened.convert("RGB")
        if min(image.size) < size:
            factor = size / min(image.size)
            image = image.resize(
                (max(size, round(image.width * factor)), max(size, round(image.height * factor))),
                Image.Resampling.BICUBIC,
            )
        left = int(torch.randint(0, image.width - size + 1, ()).item())
        top = int(torch.randint(0, image.height - size + 1, ()).item())
        patch = image.crop((left, top, left + size, top + size))
        window: Box = (
            left / image.width,
            top / image.height,
            (left + size) / image.width,
            (top + size) / image.height,
        )
        key = self.keys[index]
        prompt = boxes_for_tile(self.prompts[key], window)
        array = np.asarray(patch, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
        boxes = list(prompt.boxes)
        if self.horizontal_flip and bool(torch.rand(()) < 0.5):
            tensor = tensor.flip(-1)
            boxes = [(1.0 - x1, y0, 1.0 - x0, y1) for x0, y0, x1, y1 in boxes]
        # The caption is not the HR image's: the trainer writes it for each degraded LR, around
        # the scene words of the HR image's caption.
        return {"hr": tensor, "tags": list(prompt.tags), "boxes": boxes, "scene": self.scenes[key]}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "hr": torch.stack([sample["hr"] for sample in samples]),
        "tags": [sample["tags"] for sample in samples],
        "boxes": [sample["boxes"] for sample in samples],
        "scene": [sample["scene"] for sample in samples],
    }


# -- the degradation-aware caption of each LR ------------------------------------------------------
#
# The grounder's estimates (model.grounding.degradation) on a whole batch at once, on its device:
# the same formulas, batched, so that a step costs no host round trip per sample. They give the
# per-image estimate_degradations of each 8-bit LR image (the tests hold them to it).


def _row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(row, q)`` of each row of ``(B, N)`` (linear interpolation), without
    ``torch.quantile``'s limit on the input size."""
    ordered = rows.sort(dim=1).values
    position = q * (rows.shape[1] - 1)
    low = math.floor(position)
    high = min(low + 1, rows.shape[1] - 1)
    return ordered[:, low] + (ordered[:, high] - ordered[:, low]) * (position - low)


def _noise_sigma(channels: torch.Tensor) -> torch.Tensor:
    """Donoho's robust sigma of the finest Haar diagonal band per channel, averaged: ``(B,)``."""
    height, width = channels.shape[-2] // 2 * 2, channels.shape[-1] // 2 * 2
    if height == 0 or width == 0:
        return channels.new_zeros(channels.shape[0])
    y = channels[..., :height, :width]
    hh = (y[..., 0::2, 0::2] - y[..., 0::2, 1::2] - y[..., 1::2, 0::2] + y[..., 1::2, 1::2]) / 2.0
    return (hh.abs().flatten(2).median(dim=2).values / MAD_TO_SIGMA).mean(dim=1)


def _blur_effect(y: torch.Tensor, kernel: int = 9) -> torch.Tensor:
    """Crete-Roffet blur effect of each ``(H, W)`` luma plane, the larger of both directions."""
    scores = []
    for view in (y, y.transpose(-1, -2)):  # along rows, then along columns
        batch, rows, length = view.shape
        if length < 2:
            continue
        width = min(kernel, length)
        flat = view.reshape(batch * rows, 1, length)
        padded = F.pad(flat, (width // 2, width - 1 - width // 2), mode="replicate")
        reblurred = F.avg_pool1d(padded, width, stride=1).view(batch, rows, length)
        d_image = (view[..., 1:] - view[..., :-1]).abs()
        d_reblur = (reblurred[..., 1:] - reblurred[..., :-1]).abs()
        total = d_image.sum(dim=(1, 2))
        lost = (d_image - d_reblur).clamp(min=0).sum(dim=(1, 2))
        ratio = (total - lost) / total.clamp(min=torch.finfo(total.dtype).tiny)
        scores.append(torch.where(total > 0, ratio, torch.ones_like(total)))
    if not scores:
        return y.new_ones(y.shape[0])
    return torch.stack(scores).amax(dim=0)


def _laplacian_variance(y: torch.Tensor) -> torch.Tensor:
    """Variance of the 4-neighbour Laplacian of each luma plane (reflect-padded)."""
    if min(y.shape[-2:]) < 2:
        return y.new_zeros(y.shape[0])
    kernel = torch.tensor(
        [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=y.dtype, device=y.device
    )
    padded = F.pad(y[:, None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel[None, None]).flatten(1).var(dim=1, unbiased=False)


def _blockiness(
    y: torch.Tensor, block: int = JPEG_BLOCK, clip_quantile: float = 0.9
) -> torch.Tensor:
    """Extra luma step across the 8-pixel grid over the step inside blocks, minus one, ``>= 0``."""
    ratios = []
    for view in (y, y.transpose(-1, -2)):
        length = view.shape[-1]
        if length < 2 * block:
            continue
        steps = (view[..., 1:] - view[..., :-1]).abs()
        sample = steps.flatten(1)
        sample = sample[:, :: max(1, sample.shape[1] // 1_000_000)]
        cap = _row_quantile(sample, clip_quantile).clamp(min=1e-6)
        column_steps = torch.minimum(steps, cap[:, None, None]).mean(dim=1)
        on_grid = column_steps[:, block - 1 :: block].mean(dim=1)
        inside_mask = torch.ones(length - 1, dtype=torch.bool, device=y.device)
        inside_mask[block - 1 :: block] = False
        inside = column_steps[:, inside_mask].mean(dim=1).clamp(min=1e-6)
        ratios.append(on_grid / inside - 1.0)
    if not ratios:
        return y.new_zeros(y.shape[0])
    return torch.stack(ratios).mean(dim=0).clamp(min=0.0)


def measure_degradations(lr: torch.Tensor) -> list[DegradationEstimates]:
    """The grounder's degradation estimates of each image of ``lr`` (``(B, 3, h, w)`` in
    ``[0, 1]``, the raw LR, read as the 8-bit image a user would upload), batched on its device.
    """
    channels = (lr.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.float64)
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64, device=lr.device)
    y = torch.einsum("bchw,c->bhw", channels, weights)
    stats = torch.stack(
        [_noise_sigma(channels), _blur_effect(y), _laplacian_variance(y), _blockiness(y)], dim=1
    ).tolist()  # the one transfer to the host
    height, width = int(lr.shape[-2]), int(lr.shape[-1])
    return [
        DegradationEstimates(
            noise_sigma=noise,
            blur=blur,
            laplacian_variance=laplacian,
            blockiness=blocks,
            width=width,
            height=height,
        )
        for noise, blur, laplacian, blocks in stats
    ]


def degradation_captions(
    lr: torch.Tensor, scenes: Sequence[str], thresholds: CaptionThresholds | None = None
) -> list[str]:
    """The degradation-aware caption of each LR image: its measured estimates worded by the
    grounder's template around its scene words (what the grounder writes for it at inference)."""
    estimates = measure_degradations(lr)
    if len(scenes) != len(estimates):
        raise ValueError(f"{len(scenes)} scenes for {len(estimates)} LR images")
    return [
        compose_caption(measured, scene, thresholds)
        for measured, scene in zip(estimates, scenes, strict=True)
    ]


# -- the trained model -------------------------------------------------------------------------


class SemanticDegradationHeads(ModelMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' own mixins disagree on config_name
    """The light projections that tie the ControlNet's spatial-semantic embeddings to the frozen
    HR targets of ``L_SemDeg`` [I]: per resolution level, one 1x1 convolution from the level's
    channels to ``latent_channels + semantic_channels`` (a ``VAE(HR)`` part, then a ``SAM(HR)``
    part). Linear on purpose: what meets the targets must already be in the embedding, not be
    built by the head. Used in training only; inference never runs them."""

    @register_to_config
    def __init__(
        self,
        level_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        latent_channels: int = 4,
        semantic_channels: int = 256,
    ) -> None:
        super().__init__()
        out_channels = latent_channels + semantic_channels
        self.heads = nn.ModuleList(
            nn.Conv2d(channels, out_channels, kernel_size=1) for channels in level_channels
        )

    @classmethod
    def for_pipeline(cls, pipeline: SpaSemSRPipeline) -> SemanticDegradationHeads:
        """Heads shaped for ``pipeline``'s ControlNet levels, VAE latent and SAM channels."""
        heads: SemanticDegradationHeads = cls(
            level_channels=tuple(pipeline.controlnet.config["block_out_channels"]),
            latent_channels=int(pipeline.image_encoder.config["latent_channels"]),
            semantic_channels=int(pipeline.semantic_encoder.config.output_channels),
        )
        return heads

    def forward(self, embeddings: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(embeddings) != len(self.heads):
            raise ValueError(f"{len(embeddings)} embeddings for {len(self.heads)} heads")
        return [head(embedding) for head, embedding in zip(self.heads, embeddings, strict=True)]


class SpaSemSRTrainable(nn.Module):
    """The trained blocks as one module (what accelerate wraps, checkpoints and optimises); the
    frozen UNet they run through is held outside its parameters and ``state_dict``."""

    unet: UNet2DConditionModel

    def __init__(
        self,
        *,
        unet: UNet2DConditionModel,
        unet_attention: SpaSemSRUNetAttention,
        controlnet: SpatialSemanticControlNet,
        image_encoder: ImageEncoder,
        semantic_encoder: SamVisionModel,
        semdeg_heads: SemanticDegradationHeads | None = None,
    ) -> None:
        super().__init__()
        self.unet_attention = unet_attention
        self.controlnet = controlnet
        self.image_encoder = image_encoder
        self.semantic_encoder = semantic_encoder
        # None when L_SemDeg is off: DDP must not hold parameters that no forward uses
        self.semdeg_heads = semdeg_heads
        # not a submodule: frozen, so neither DDP, the optimiser nor save_state should see it
        object.__setattr__(self, "unet", unet)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        low_res: torch.Tensor,
        text: torch.Tensor,
        spatial_text: torch.Tensor,
        unet_text: torch.Tensor,
    ) -> dict[str, Any]:
        """ε prediction, the encoders' outputs and the heads' projections of the ControlNet's
        embeddings (inside the forward, so that DDP synchronises the heads too). ``text``
        (``T_deg``) conditions the ControlNet, ``unet_text`` the UNet's own cross-attention, as
        in :meth:`SpaSemSRPipeline._forward`."""
        latent = self.image_encoder(low_res)
        height, width = latent.shape[-2:]
        semantic = semantic_features(self.semantic_encoder, low_res, size=(height, width))
        guidance = torch.cat([latent, semantic.to(latent.dtype)], dim=1)
        control = self.controlnet(
            noisy_latents,
            timesteps,
            spatial_text=spatial_text,
            degradation_text=text,
            guidance=guidance,
        )
        noise_pred = unet_with_control(
            self.unet, noisy_latents, timesteps, text=unet_text, spatial_text=spatial_text,
            control=control,
        )  # fmt: skip
        out: dict[str, Any] = {"noise_pred": noise_pred, "latent": latent, "semantic": semantic}
        if self.semdeg_heads is not None:
            out["projections"] = self.semdeg_heads(control.embeddings)
        return out


def semdeg_terms(
    out: dict[str, Any], latent_target: torch.Tensor, semantic_target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The four L1 terms of ``L_SemDeg`` (module docstring) from :class:`SpaSemSRTrainable`'s
    outputs and the frozen HR targets at latent resolution; the ControlNet terms average their
    levels, each compared with the targets average-pooled to its resolution."""
    terms = {
        "image": F.l1_loss(out["latent"].float(), latent_target),
        "semantic": F.l1_loss(out["semantic"].float(), semantic_target),
    }
    projections: list[torch.Tensor] = out.get("projections") or []
    if projections:
        split = latent_target.shape[1]
        image_parts, semantic_parts = [], []
        for projection in projections:
            size = (int(projection.shape[-2]), int(projection.shape[-1]))
            projection = projection.float()
            image_parts.append(
                F.l1_loss(projection[:, :split], F.adaptive_avg_pool2d(latent_target, size))
            )
            semantic_parts.append(
                F.l1_loss(projection[:, split:], F.adaptive_avg_pool2d(semantic_target, size))
            )
        terms["controlnet_image"] = torch.stack(image_parts).mean()
        terms["controlnet_semantic"] = torch.stack(semantic_parts).mean()
    return terms


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module``; cast only the floating-point tensors that are not in ``dtype`` yet
    (diffusers warns on every dtype cast)."""
    module.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)


def vae_latents(vae: AutoencoderKL, images: torch.Tensor, *, sample: bool) -> torch.Tensor:
    """Scaled VAE latents of ``images`` in ``[-1, 1]`` (the diffusion space and the image
    encoder's target); ``sample`` draws from the posterior, else its mode."""
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    latents = posterior.sample() if sample else posterior.mode()
    shift = float(vae.config.get("shift_factor") or 0.0)
    scaled: torch.Tensor = (latents.float() - shift) * float(vae.config["scaling_factor"])
    return scaled


def load_sam_target(
    pipeline: SpaSemSRPipeline,
    pipeline_dir: Path | None = None,
    *,
    sam_dir: Path | None = None,
) -> SamVisionModel:
    """The frozen SAM that the semantic constraint aims at.

    In this order: ``sam_dir`` (a transformers SAM folder, ``SamModel`` or ``SamVisionModel``),
    the pipeline folder's ``sam_target/`` (written beside the blocks by
    :meth:`SpaSemSRTrainer.save_pipeline`), or, for an untrained pipeline, a copy of its semantic
    encoder: untrained, that is still the SAM it was assembled from. A trained pipeline with
    neither is refused: its semantic encoder is SAM no longer, and as the target it would let the
    fine-tuned encoder chase itself.
    """
    folders = [sam_dir, pipeline_dir / SAM_TARGET if pipeline_dir is not None else None]
    folder = next((Path(f) for f in folders if f is not None and Path(f).is_dir()), None)
    if folder is not None:
        target = SamVisionModel.from_pretrained(str(folder))
    elif not bool(pipeline.config.get("trained", False)):
        target = copy.deepcopy(pipeline.semantic_encoder)
    else:
        raise ValueError(
            "the pipeline's semantic encoder is trained, so it cannot be the frozen SAM target of "
            f"the semantic constraint, and {pipeline_dir or 'the pipeline'} has no {SAM_TARGET}/ "
            "folder: give the SAM folder it was assembled from (sam_dir)"
        )
    expected = pipeline.semantic_encoder.config.output_channels
    if target.config.output_channels != expected:
        raise ValueError(
            f"the SAM target gives {target.config.output_channels} channels, the semantic "
            f"encoder {expected}"
        )
    return target


def _write_folder(directory: Path, name: str, save: Callable[[Path], None]) -> None:
    """``save`` into ``directory/name`` through a staging sibling renamed into place, so that
    an interrupted write never leaves a half-written folder under the real name."""
    staging = directory / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save(staging)
    old = directory / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if (directory / name).exists():
        (directory / name).rename(old)
    staging.rename(directory / name)
    shutil.rmtree(old, ignore_errors=True)


class SpaSemSRTrainer:
    """Owns the pipeline's components for one run: losses, optimiser, loop and checkpoints.

    ``sam_target`` is the frozen SAM of the semantic constraint (default:
    :func:`load_sam_target` of the pipeline alone, which refuses a trained pipeline);
    ``semdeg_heads`` the projection heads to continue from (default: fresh ones);
    ``caption_thresholds`` the grounder's, so that training captions are worded as it words them.
    """

    def __init__(
        self,
        pipeline: SpaSemSRPipeline,
        config: TrainingConfig,
        *,
        accelerator: Accelerator | None = None,
        base_dir: Path | None = None,
        sam_target: SamVisionModel | None = None,
        semdeg_heads: SemanticDegradationHeads | None = None,
        caption_thresholds: CaptionThresholds | None = None,
    ) -> None:
        self.config = config
        self.base_dir = base_dir
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        self.pipeline = pipeline
        device = self.accelerator.device
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            str(self.accelerator.mixed_precision), torch.float32
        )
        self.weight_dtype = weight_dtype
        self.caption_thresholds = caption_thresholds or CaptionThresholds()
        # 1. the frozen parts: no gradients, no optimiser state, cast to the compute dtype; the
        #    SAM target stays float32 (its forward runs under autocast), so that the copy saved
        #    beside the blocks is the SAM itself, not a rounded one
        self.sam_target: SamVisionModel = sam_target or load_sam_target(pipeline)
        for module in (pipeline.vae, pipeline.text_encoder, pipeline.unet):
            _place(freeze(module), device, weight_dtype)
        _place(freeze(self.sam_target), device, torch.float32)
        # 2. the trained blocks (DESIGN 1.1), in float32 (accelerate autocasts their forward)
        if config.lambda_semdeg > 0 and semdeg_heads is None:
            semdeg_heads = SemanticDegradationHeads.for_pipeline(pipeline)
        self.trainable = SpaSemSRTrainable(
            unet=pipeline.unet,
            unet_attention=pipeline.unet_attention,
            controlnet=pipeline.controlnet,
            image_encoder=pipeline.image_encoder,
            semantic_encoder=pipeline.semantic_encoder,
            semdeg_heads=semdeg_heads if config.lambda_semdeg > 0 else None,
        )
        _place(self.trainable, device, torch.float32)
        self.trainable.requires_grad_(True).train()
        if config.gradient_checkpointing:
            pipeline.unet.enable_gradient_checkpointing()
            pipeline.controlnet.enable_gradient_checkpointing()
            pipeline.image_encoder.enable_gradient_checkpointing()
            pipeline.semantic_encoder.gradient_checkpointing_enable()
        self.text = TextConditioner(pipeline.tokenizer, pipeline.text_encoder)
        self.noise_scheduler = pipeline.make_scheduler("ddpm")
        self.degradation = RealESRGANDegradation(RealESRGANDegradationConfig(scale=config.scale))
        self.optimizer = torch.optim.AdamW(
            [p for p in self.trainable.parameters() if p.requires_grad],
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        self.lr_scheduler = get_constant_schedule_with_warmup(
            self.optimizer, num_warmup_steps=config.warmup_steps
        )
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.trainable, self.optimizer, self.lr_scheduler
        )
        self.generator = torch.Generator(device=device).manual_seed(
            config.seed + self.accelerator.process_index
        )
        self._sums: dict[str, float] = {}
        self._micro = 0

    # -- one batch ---------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_text(
        self, captions: Sequence[str], batch: dict[str, Any], keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``T_deg`` (the kept captions in one encoder pass), ``T_spa`` and the UNet's text per
        sample (the sample's tag prompt, or ``T_deg``, as the pipeline's ``unet_prompt`` says);
        dropped samples get the empty prompt for all three."""
        null = self.text.encode("")
        kept = [index for index in range(len(captions)) if bool(keep[index])]
        texts = null.repeat(len(captions), 1, 1)
        if kept:
            texts[kept] = self.text.encode_many([captions[index] for index in kept])
        pairs = [
            self.text.encode_spatial_and_tags(batch["tags"][index], batch["boxes"][index])
            if index in kept
            else (null, null)
            for index in range(len(captions))
        ]
        spatials = torch.cat([spatial for spatial, _ in pairs])
        if self.pipeline.config["unet_prompt"] == "caption":
            unet_texts = texts.clone()
        else:
            unet_texts = torch.cat([tags for _, tags in pairs])
        dtype = self.weight_dtype
        return texts.to(dtype), spatials.to(dtype), unet_texts.to(dtype)

    def captions(self, lr: torch.Tensor, batch: dict[str, Any]) -> list[str]:
        """The degradation-aware caption of each synthesised LR (module docstring)."""
        return degradation_captions(lr, batch["scene"], self.caption_thresholds)

    def losses(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Every loss term on one batch of HR patches (degradation, noise, timesteps and prompt
        dropout drawn from ``generator``, the trainer's own by default)."""
        config = self.config
        generator = generator or self.generator
        device = self.accelerator.device
        hr = batch["hr"].to(device, torch.float32)
        size = hr.shape[0]
        constrained = config.lambda_semdeg > 0
        with torch.no_grad():
            # LR on the device; its caption from its own measured degradations; then the LR
            # bicubically back to the HR size, the encoders' input as at inference
            lr = self.degradation(hr, generator)
            captions = self.captions(lr, batch)
            low_res = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
            low_res = (low_res * 2.0 - 1.0).clamp(-1.0, 1.0)
            hr_signed = hr * 2.0 - 1.0
            latents = vae_latents(self.pipeline.vae, hr_signed, sample=True)
            if constrained:
                latent_target = vae_latents(self.pipeline.vae, hr_signed, sample=False)
                with self.accelerator.autocast():
                    semantic_target = semantic_features(
                        self.sam_target, hr_signed, size=(latents.shape[-2], latents.shape[-1])
                    ).float()
            noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(
                device
            )
            timesteps = torch.randint(
                0,
                int(self.noise_scheduler.config["num_train_timesteps"]),
                (size,),
                generator=generator,
                device=generator.device,
            ).to(device)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            keep = torch.rand(size, generator=generator, device=generator.device)
            keep = keep >= config.null_prompt_ratio
            text, spatial_text, unet_text = self._encode_text(captions, batch, keep.cpu())
            if self.noise_scheduler.config["prediction_type"] == "v_prediction":
                target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
        out = self.model(
            noisy.to(self.weight_dtype),
            timesteps,
            low_res=low_res,
            text=text,
            spatial_text=spatial_text,
            unet_text=unet_text,
        )
        terms = {"diffusion": F.mse_loss(out["noise_pred"].float(), target.float())}
        total = terms["diffusion"]
        if constrained:
            parts = semdeg_terms(out, latent_target, semantic_target)
            terms["semdeg"] = torch.stack(list(parts.values())).sum()
            terms.update(parts)
            total = total + config.lambda_semdeg * terms["semdeg"]
        return {"total": total, **terms}

    def training_step(self, batch: dict[str, Any]) -> dict[str, float] | None:
        """One micro-batch: loss, backward, and at the end of an accumulation cycle clip and step.

        Returns the mean of every term over the cycle when the optimiser stepped, else ``None``.
        """
        with self.accelerator.accumulate(self.model):
            terms = self.losses(batch)
            self.accelerator.backward(terms["total"])
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
        self._micro += 1
        if not self.accelerator.sync_gradients:
            return None
        means = {name: total / self._micro for name, total in self._sums.items()}
        self._sums, self._micro = {}, 0
        return means

    # -- checkpoints -------------------------------------------------------------------------

    def save_pipeline(self, directory: Path) -> Path:
        """Write the pipeline with the current trained blocks, marked trained.

        The first time the base pipeline folder is copied (or, for a pipeline built in memory,
        the whole pipeline saved), so the frozen parts keep their original files and precision;
        then only the trained blocks are replaced, each written beside its folder and renamed
        into place, and ``model_index.json`` is marked trained (with its ``unet_prompt``). Beside
        the blocks go the projection heads (``semdeg_heads/``) and, once, the frozen SAM target
        (``sam_target/``), so that fine-tuning this folder later aims at SAM, not at its trained
        semantic encoder.
        """
        pipeline = self.pipeline
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not (directory / "model_index.json").is_file():
            staging = directory.with_name(f".{directory.name}.staging")
            shutil.rmtree(staging, ignore_errors=True)
            if self.base_dir is not None:
                shutil.copytree(self.base_dir, staging)
            else:
                pipeline.save_pretrained(staging)
            if directory.exists():
                shutil.rmtree(directory)
            staging.rename(directory)
        for name in TRAINED_BLOCKS:
            _write_folder(directory, name, getattr(unwrapped, name).save_pretrained)
        if unwrapped.semdeg_heads is not None:
            _write_folder(directory, SEMDEG_HEADS, unwrapped.semdeg_heads.save_pretrained)
        if not (directory / SAM_TARGET).is_dir():
            _write_folder(directory, SAM_TARGET, self.sam_target.save_pretrained)
        index_file = directory / "model_index.json"
        index = json.loads(index_file.read_text())
        index["trained"] = True
        # the text routing it was trained with, even when the copied base folder predates it
        index["unet_prompt"] = pipeline.config["unet_prompt"]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return directory

    def save_checkpoint(self, output_dir: Path, step: int) -> Path:
        """``save_state`` (blocks, optimiser, scheduler, RNG) plus the loadable pipeline folder."""
        folder = output_dir / CHECKPOINTS / f"checkpoint-{step}"
        self.accelerator.save_state(str(folder))
        if self.accelerator.is_main_process:
            (folder / "step.json").write_text(json.dumps({"step": step}) + "\n")
            self.save_pipeline(output_dir / PIPELINE)
            limit = self.config.checkpoints_total_limit
            if limit is not None:
                for stale in list_checkpoints(output_dir)[:-limit]:
                    shutil.rmtree(stale, ignore_errors=True)
            logger.info("step %d: checkpoint %s, pipeline %s", step, folder, output_dir / PIPELINE)
        self.accelerator.wait_for_everyone()
        return folder

    def resume(self, output_dir: Path) -> int:
        """Load the latest checkpoint under ``output_dir``; the step to continue from (0 when
        there is none)."""
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("no checkpoint under %s: starting from step 0", output_dir)
            return 0
        latest = checkpoints[-1]
        self.accelerator.load_state(str(latest))
        step = int(json.loads((latest / "step.json").read_text())["step"])
        # the degradation / noise generator is ours, not accelerate's: re-seed it per step
        self.generator.manual_seed(self.config.seed + self.accelerator.process_index + step)
        logger.info("resumed from %s at step %d", latest, step)
        return step


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>`` folders under ``output_dir/checkpoints``, oldest first."""
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (match := _CHECKPOINT_NAME.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def _cycle(loader: DataLoader[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


def load_base_pipeline(pipeline_dir: Path | None, *, seed: int) -> SpaSemSRPipeline:
    """The pipeline to train from: a saved folder, or the tiny configuration with seeded weights."""
    if pipeline_dir is None:
        from model.configs.spasemsr import build_tiny_pipeline

        logger.warning("no pipeline folder given: training the tiny configuration (seed %d)", seed)
        return build_tiny_pipeline(seed)
    pipeline = SpaSemSRPipeline.from_pretrained(str(pipeline_dir))
    assert isinstance(pipeline, SpaSemSRPipeline)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def train(
    config: TrainingConfig,
    *,
    data_dir: Path,
    output_dir: Path,
    pipeline_dir: Path | None = None,
    resume: bool = False,
    grounder: Grounder | None = None,
    pipeline: SpaSemSRPipeline | None = None,
    accelerator: Accelerator | None = None,
    sam_dir: Path | None = None,
) -> TrainingReport:
    """Train SpaSemSR's blocks on the HR images under ``data_dir`` (DESIGN 1.4).

    ``pipeline`` (an already loaded base pipeline) takes precedence over ``pipeline_dir``; with
    neither, the tiny configuration is trained. ``resume`` continues from the latest checkpoint
    in ``output_dir``; the base pipeline must be the same as for the first run. The SAM target
    of the semantic constraint is :func:`load_sam_target`'s: ``sam_dir``, else the folder's
    ``sam_target/``, else the untrained base's own semantic encoder. The trained, loadable
    pipeline is written to ``output_dir/pipeline`` at every checkpoint and at the end.
    """
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    started = time.perf_counter()
    set_seed(config.seed)
    base = pipeline if pipeline is not None else load_base_pipeline(pipeline_dir, seed=config.seed)
    base_dir = (
        Path(pipeline_dir)
        if pipeline is None and pipeline_dir is not None and Path(pipeline_dir).is_dir()
        else None
    )
    heads_dir = base_dir / SEMDEG_HEADS if base_dir is not None else None
    trainer = SpaSemSRTrainer(
        base,
        config,
        accelerator=accelerator,
        base_dir=base_dir,
        sam_target=load_sam_target(base, base_dir, sam_dir=sam_dir),
        semdeg_heads=(
            SemanticDegradationHeads.from_pretrained(str(heads_dir))
            if heads_dir is not None and heads_dir.is_dir() and config.lambda_semdeg > 0
            else None
        ),
        caption_thresholds=caption_thresholds_of(grounder),
    )
    accel = trainer.accelerator

    # 1. data: HR files, prompts grounded once (main process) and cached beside the outputs
    files = find_hr_images(data_dir)
    root = data_dir / "hr" if (data_dir / "hr").is_dir() else data_dir
    cache_file = output_dir / PROMPT_CACHE
    grounded = 0
    if accel.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        prompts, grounded = build_prompt_cache(files, root, cache_file, grounder)
        (output_dir / "training_config.json").write_text(
            json.dumps(
                {
                    **config.to_dict(),
                    "data_dir": str(data_dir),
                    "pipeline_dir": str(pipeline_dir) if pipeline_dir else None,
                },
                indent=2,
            )
            + "\n"
        )
    accel.wait_for_everyone()
    if not accel.is_main_process:
        prompts, _ = build_prompt_cache(files, root, cache_file, None)
    dataset = HRPatchDataset(
        files,
        root,
        prompts,
        resolution=config.resolution,
        horizontal_flip=config.horizontal_flip,
    )
    loader: DataLoader[dict[str, Any]] = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.num_workers,
        collate_fn=collate,
        drop_last=len(dataset) >= config.batch_size,
    )
    loader = accel.prepare(loader)

    # 2. resume
    first_step = trainer.resume(output_dir) if resume else 0
    report = TrainingReport(
        output_dir=output_dir,
        pipeline_dir=output_dir / PIPELINE,
        first_step=first_step,
        global_step=first_step,
        grounded_images=grounded,
    )
    if first_step >= config.max_steps:
        logger.info("already at step %d of %d: nothing to train", first_step, config.max_steps)
        report.seconds = time.perf_counter() - started
        return report

    # 3. the loop: log the mean of each term per optimiser step, checkpoint every N steps
    progress = tqdm(
        total=config.max_steps,
        initial=first_step,
        desc="training",
        disable=not accel.is_local_main_process,
    )
    loop_started = time.perf_counter()
    step = first_step
    batches = _cycle(loader)
    mark = time.perf_counter()
    while step < config.max_steps:
        means = trainer.training_step(next(batches))
        if means is None:
            continue
        step += 1
        report.losses.append(means)
        progress.update(1)
        progress.set_postfix(loss=f"{means['total']:.4f}")
        if step % config.log_every == 0 or step == config.max_steps:
            logger.info(
                "step %d/%d lr %.2e %s",
                step,
                config.max_steps,
                trainer.lr_scheduler.get_last_lr()[0],
                " ".join(f"{name} {value:.4f}" for name, value in means.items()),
            )
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            report.checkpoints.append(trainer.save_checkpoint(output_dir, step))
        now = time.perf_counter()
        report.step_seconds.append(now - mark)
        mark = now
    progress.close()
    report.global_step = step
    report.seconds = time.perf_counter() - loop_started
    logger.info(
        "trained steps %d..%d in %.1f s (%.3f steps/s); pipeline at %s",
        first_step,
        step,
        report.seconds,
        report.steps_per_second,
        report.pipeline_dir,
    )
    return report
