# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""``SpaSemSRPipeline``: spatial-semantic guided diffusion super-resolution (arXiv 2603.14112, Fig.
2).

The forward pass of DESIGN 1.2, as numbered steps in :meth:`SpaSemSRPipeline.__call__`:

1. bicubic upsampling of the LR image to ``scale x`` its size (the colour-fix reference), padded to
   a multiple the VAE and UNet can halve;
2. text, once per image: ``T_deg`` (degradation-aware caption) and the negative prompt through the
   frozen
   text encoder; ``T_spa`` (tags + aligned box add) once per tile, from the boxes that intersect it;
3. scheduler by name (DDPM, DDIM, DPM-Solver++, UniPC) and its timesteps;
4. the start latent: the VAE latent of the upsampled LR noised to the first timestep (SeeSR's LR
   embedding start [I]); one noise tensor for the whole latent, shared by all tiles;
5. visual guidance, once per tile: ``concat(ImageEncoder, SemanticEncoder)`` of the tile's crop;
6. denoising ("Multi Denoise", Fig. 2d): per tile, the Spatial-Semantic ControlNet then the UNet
   with its
   added attention, classifier-free guidance with the negative prompt, Gaussian-blended tile
   predictions,
   one scheduler step over the whole latent; a callback after every step (progress, cancellation);
7. tiled VAE decode, crop to exactly ``scale x`` the input, colour fix (``none | adain | wavelet``).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.outputs import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, SamVisionModel

from model.color import COLOR_FIX_MODES, apply_color_fix
from model.controlnet import SpatialSemanticControlNet
from model.encoders import ImageEncoder, visual_guidance
from model.performance import PerformanceSettings, attention_context
from model.prompt import Box, GroundedPrompt
from model.text import DEFAULT_NEGATIVE_PROMPT, TextConditioner, default_prompt
from model.tiling import (
    Tile,
    boxes_for_tile,
    gaussian_weights,
    tile_grid,
    tiled_vae_decode,
    tiled_vae_encode,
)
from model.unet_attention import SpaSemSRUNetAttention, unet_with_control

logger = logging.getLogger(__name__)

StageCallback = Callable[[str, int, int], None]
"""``(stage, step, total)``: ``encode`` and ``decode`` at 0 and 1 of 1, ``denoise`` after each step
1..N. An exception raised by the callback propagates unchanged (that is how a caller cancels)."""

SCHEDULERS: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SCALES = (2, 4)


@dataclass
class SpaSemSRPipelineOutput(BaseOutput):
    """``images``: PIL images (or a ``(B, 3, H, W)`` tensor in [0, 1]); ``timings``: seconds per
    stage; ``prompt``: the grounded prompt used."""

    images: list[Image.Image] | torch.Tensor
    timings: dict[str, float]
    prompt: GroundedPrompt


@dataclass
class _TileConditioning:
    """What one tile sees at every step, computed once before the loop."""

    tile: Tile
    spatial_text: torch.Tensor
    guidance: torch.Tensor
    weights: torch.Tensor | None


@dataclass
class _BatchConditioning:
    """The conditioning of a batch of same-shape tiles, concatenated once before the loop:
    per CFG half ``(T_deg, T_spa, f)``, and all halves joined for a single forward."""

    tiles: list[_TileConditioning]
    halves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    joined: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SpaSemSRPipeline(DiffusionPipeline):
    """SpaSemSR super-resolution on diffusers components plus SpaSemSR's own blocks.

    Components: SD2 ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (stock, frozen) and
    ``scheduler``; SpaSemSR's ``unet_attention`` (attention added to the UNet), ``controlnet``,
    ``image_encoder`` and ``semantic_encoder`` (SAM ViT). ``configuration`` names the shapes
    (``tiny``, ``sd2``) and ``trained`` says whether SpaSemSR's blocks carry trained weights;
    both are saved in ``model_index.json``.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        unet_attention: SpaSemSRUNetAttention,
        controlnet: SpatialSemanticControlNet,
        image_encoder: ImageEncoder,
        semantic_encoder: SamVisionModel,
        scheduler: SchedulerMixin,
        configuration: str = "custom",
        trained: bool = False,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            unet_attention=unet_attention,
            controlnet=controlnet,
            image_encoder=image_encoder,
            semantic_encoder=semantic_encoder,
            scheduler=scheduler,
        )
        self.register_to_config(configuration=configuration, trained=trained)
        unet_attention.install(unet)
        self.vae_scale_factor = int(2 ** (len(vae.config["block_out_channels"]) - 1))
        self.latent_multiple = int(2 ** (len(unet.config["block_out_channels"]) - 1))
        self.text_conditioner = TextConditioner(tokenizer, text_encoder)
        # How the loop batches its work (CFG halves, tiles) and which attention kernels it
        # allows; model.performance.apply_performance sets it together with dtypes and compile.
        self.performance = PerformanceSettings()

    @property
    def pixel_multiple(self) -> int:
        """Output sides are padded to a multiple of this (VAE factor x UNet halvings)."""
        return self.vae_scale_factor * self.latent_multiple

    # -- 0. inputs ---------------------------------------------------------------------------------

    def check_inputs(
        self,
        image: Image.Image | torch.Tensor,
        *,
        scale: int,
        prompt: GroundedPrompt | None,
        num_inference_steps: int,
        guidance_scale: float,
        scheduler: str,
        color_fix: str,
        tile_size: int | None,
        tile_overlap: int | None,
    ) -> None:
        if isinstance(image, Image.Image):
            if image.width < 1 or image.height < 1:
                raise ValueError(f"the image is empty ({image.width}x{image.height})")
        elif isinstance(image, torch.Tensor):
            if (
                image.ndim not in (3, 4)
                or image.shape[-3] != 3
                or (image.ndim == 4 and image.shape[0] != 1)
            ):
                raise ValueError(
                    f"a tensor image must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}"
                )
        else:
            raise ValueError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale}")
        if prompt is not None and not isinstance(prompt, GroundedPrompt):
            raise ValueError(
                f"prompt must be a GroundedPrompt or None, got {type(prompt).__name__}"
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps must be a positive integer, got {num_inference_steps}"
            )
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        if scheduler not in SCHEDULERS:
            raise ValueError(
                f"unknown scheduler {scheduler!r}; expected one of {tuple(SCHEDULERS)}"
            )
        if color_fix not in COLOR_FIX_MODES:
            raise ValueError(f"unknown colour fix {color_fix!r}; expected one of {COLOR_FIX_MODES}")
        if tile_size is not None and tile_size < self.pixel_multiple:
            raise ValueError(
                f"tile_size must be at least {self.pixel_multiple} pixels, got {tile_size}"
            )
        if tile_overlap is not None and tile_size is not None and not 0 <= tile_overlap < tile_size:
            raise ValueError(f"tile_overlap must be in [0, tile_size), got {tile_overlap}")

    # -- helpers -----------------------------------------------------------------------------------

    def make_scheduler(self, name: str) -> Any:
        """A fresh scheduler of kind ``name`` from the pipeline's scheduler configuration."""
        scheduler_class, overrides = SCHEDULERS[name]
        config = {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}
        return scheduler_class.from_config({**config, **overrides})

    def _to_tensor(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """``(1, 3, H, W)`` in ``[-1, 1]`` on the pipeline's device, float32."""
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
        else:
            tensor = image.float()[None] if image.ndim == 3 else image.float()
        return (tensor.to(self.device) * 2.0 - 1.0).clamp(-1.0, 1.0)

    def _pad(self, image: torch.Tensor) -> torch.Tensor:
        multiple = self.pixel_multiple
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if not (pad_h or pad_w):
            return image
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        return F.pad(image, (0, pad_w, 0, pad_h), mode=mode)

    def _tiles(
        self, height: int, width: int, tile_size: int | None, tile_overlap: int | None
    ) -> list[Tile]:
        """Latent tiles of a ``height x width`` latent; one tile when untiled or when the latent
        fits one."""
        if tile_size is None:
            return [Tile(0, 0, height, width)]
        tile = max(self.latent_multiple, tile_size // self.pixel_multiple * self.latent_multiple)
        overlap = (
            tile_size // 4 if tile_overlap is None else tile_overlap
        ) // self.vae_scale_factor
        return tile_grid(height, width, tile, min(overlap, tile - 1), align=self.latent_multiple)

    def _tile_box(self, tile: Tile, out_h: int, out_w: int) -> Box:
        """A latent tile as a normalised box of the unpadded output (padding clipped away)."""
        factor = self.vae_scale_factor
        return (
            min(1.0, tile.left * factor / out_w),
            min(1.0, tile.top * factor / out_h),
            min(1.0, (tile.left + tile.width) * factor / out_w),
            min(1.0, (tile.top + tile.height) * factor / out_h),
        )

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _prepare_batch(
        self, batch: list[_TileConditioning], text: torch.Tensor
    ) -> _BatchConditioning:
        """Per-image work for a batch of tiles, done once: the loop only stacks latents."""
        count = len(batch)
        halves = [slice(0, 1), slice(1, 2)] if text.shape[0] == 2 else [slice(0, 1)]
        inputs = [
            (
                text[half].expand(count, *text.shape[1:]),
                torch.cat([c.spatial_text[half] for c in batch]),
                torch.cat([c.guidance[half] for c in batch]),
            )
            for half in halves
        ]
        t_deg, t_spa, f = (torch.cat(parts) for parts in zip(*inputs, strict=True))
        return _BatchConditioning(tiles=batch, halves=inputs, joined=(t_deg, t_spa, f))

    def _forward(
        self,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        spatial_text: torch.Tensor,
        guidance: torch.Tensor,
        conditioning_scale: float,
    ) -> torch.Tensor:
        """One ControlNet + UNet forward on a batch (every argument batch-aligned)."""
        if self.performance.cuda_graphs:
            # CUDA-graph trees replay per step; tell them a new step begins so that outputs of the
            # previous replay (already consumed) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        with attention_context(self.performance.attention):
            control = self.controlnet(
                model_input,
                timestep,
                spatial_text=spatial_text,
                degradation_text=text,
                guidance=guidance,
                conditioning_scale=conditioning_scale,
            )
            noise = unet_with_control(
                self.unet, model_input, timestep, text=text, spatial_text=spatial_text,
                control=control,
            )  # fmt: skip
        # Cloned so that a CUDA-graph replay of the next batch cannot overwrite it.
        return noise.clone() if self.performance.cuda_graphs else noise

    def _predict_noise_tiles(
        self,
        latents: list[torch.Tensor],
        timestep: torch.Tensor,
        prepared: _BatchConditioning,
        guidance_scale: float,
        conditioning_scale: float,
    ) -> list[torch.Tensor]:
        """ε for tiles of one shape in one batch; with classifier-free guidance the batch is
        ``[uncond of every tile, cond of every tile]``, run as one forward when
        ``performance.cfg_batched`` else as two."""
        x = torch.cat(latents)
        halves = len(prepared.halves)
        if self.performance.cfg_batched or halves == 1:
            t_deg, t_spa, f = prepared.joined
            noise = self._forward(x.repeat(halves, 1, 1, 1), timestep, t_deg, t_spa, f,
                                  conditioning_scale)  # fmt: skip
            outputs = list(noise.chunk(halves))
        else:
            outputs = [
                self._forward(x, timestep, t_deg, t_spa, f, conditioning_scale)
                for t_deg, t_spa, f in prepared.halves
            ]
        if halves == 2:
            uncond, cond = outputs
            noise = uncond + guidance_scale * (cond - uncond)
        else:
            noise = outputs[0]
        return list(noise.split(latents[0].shape[0]))

    def _tile_batches(self, conditions: list[_TileConditioning]) -> list[list[_TileConditioning]]:
        """Tiles of the same shape in batches of at most ``performance.tile_batch_size``."""
        size = max(1, self.performance.tile_batch_size)
        groups: dict[tuple[int, ...], list[_TileConditioning]] = {}
        for condition in conditions:
            key = (condition.tile.height, condition.tile.width, *condition.spatial_text.shape)
            groups.setdefault(key, []).append(condition)
        return [
            group[start : start + size]
            for group in groups.values()
            for start in range(0, len(group), size)
        ]

    # -- the pipeline ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image | torch.Tensor,
        *,
        scale: int = 4,
        prompt: GroundedPrompt | None = None,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        scheduler: str = "dpmsolver++",
        generator: torch.Generator | None = None,
        color_fix: str = "wavelet",
        tile_size: int | None = 512,
        tile_overlap: int | None = None,
        conditioning_scale: float = 1.0,
        callback: StageCallback | None = None,
        output_type: str = "pil",
    ) -> SpaSemSRPipelineOutput:
        """Upscale ``image`` (PIL, or a tensor in [0, 1]) by ``scale`` (2 or 4).

        ``prompt`` is the grounded prompt (tags, boxes normalised to the image, caption);
        ``None`` uses :func:`model.text.default_prompt`. ``tile_size`` / ``tile_overlap`` are in
        output pixels (``None`` tile size: one tile whatever the size; ``None`` overlap: a
        quarter tile). Classifier-free guidance runs when ``guidance_scale > 1``.
        ``callback(stage, step, total)`` is called per stage and after every denoising step;
        whatever it raises propagates. The output is exactly ``scale x`` the input size.
        """
        # 0. check inputs
        self.check_inputs(
            image,
            scale=scale,
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            color_fix=color_fix,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
        )
        notify = callback or (lambda stage, step, total: None)
        prompt = prompt if prompt is not None else default_prompt()
        dtype = self.unet.dtype
        do_cfg = guidance_scale > 1.0
        timings: dict[str, float] = {}
        notify("encode", 0, 1)
        started = self._sync()

        # 1. upsample the LR image (the colour-fix reference) and pad it for the VAE and the UNet
        low_res = self._to_tensor(image)
        out_h, out_w = low_res.shape[-2] * scale, low_res.shape[-1] * scale
        reference = F.interpolate(low_res, size=(out_h, out_w), mode="bicubic", align_corners=False)
        reference = reference.clamp(-1.0, 1.0)
        upsampled = self._pad(reference).to(dtype)
        latent_h, latent_w = (
            upsampled.shape[-2] // self.vae_scale_factor,
            upsampled.shape[-1] // self.vae_scale_factor,
        )
        tiles = self._tiles(latent_h, latent_w, tile_size, tile_overlap)

        # 2. text, once per image: T_deg, the negative prompt, and T_spa of each tile from the
        #    boxes that intersect it (tiles with the same tags share one text-encoder pass)
        text = self.text_conditioner.encode(prompt.caption).to(dtype)
        negative = self.text_conditioner.encode(negative_prompt or "").to(dtype)
        if do_cfg:
            text = torch.cat([negative, text])
        tag_cache: dict[tuple[str, ...], tuple[torch.Tensor, list[list[int]]]] = {}
        spatial_texts = []
        for tile in tiles:
            local = boxes_for_tile(prompt, self._tile_box(tile, out_h, out_w))
            spatial = self.text_conditioner.encode_spatial(local.tags, local.boxes, cache=tag_cache)
            spatial = spatial.to(dtype)
            spatial_texts.append(torch.cat([negative, spatial]) if do_cfg else spatial)
        timings["text"] = self._sync() - started

        # 3. scheduler and timesteps
        noise_scheduler = self.make_scheduler(scheduler)
        noise_scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = noise_scheduler.timesteps
        step_kwargs = (
            {"generator": generator}
            if "generator" in inspect.signature(noise_scheduler.step).parameters
            else {}
        )

        # 4. start latent: the noised VAE latent of the upsampled LR (SeeSR's LR embedding start)
        mark = self._sync()
        vae_tile = (
            tile_size // self.vae_scale_factor if tile_size is not None else max(latent_h, latent_w)
        )
        lr_latents = tiled_vae_encode(
            self.vae, upsampled.to(self.vae.dtype), tile=vae_tile, overlap=vae_tile // 8
        )
        noise = randn_tensor(
            lr_latents.shape, generator=generator, device=self.device, dtype=torch.float32
        )
        latents = noise_scheduler.add_noise(lr_latents.float(), noise, timesteps[:1]).to(dtype)
        timings["vae_encode"] = self._sync() - mark

        # 5. per-tile conditioning, once before the loop: visual guidance f of the tile's crop,
        #    its T_spa, its Gaussian blending weights
        mark = self._sync()
        conditions = []
        total_weight = torch.zeros(1, 1, latent_h, latent_w, device=self.device)
        for tile, spatial in zip(tiles, spatial_texts, strict=True):
            rows, cols = tile.scaled(self.vae_scale_factor).slices
            crop = upsampled[..., rows, cols]
            guidance = visual_guidance(self.image_encoder, self.semantic_encoder, crop).to(dtype)
            weights = None
            if len(tiles) > 1:
                weights = gaussian_weights(tile.height, tile.width).to(self.device)
                total_weight[..., tile.slices[0], tile.slices[1]] += weights
            conditions.append(
                _TileConditioning(
                    tile=tile,
                    spatial_text=spatial,
                    guidance=torch.cat([guidance, guidance]) if do_cfg else guidance,
                    weights=weights,
                )
            )
        timings["guidance"] = self._sync() - mark
        timings["encode"] = self._sync() - started
        notify("encode", 1, 1)

        # 6. denoising: per tile ControlNet + UNet (tiles of one shape batched), Gaussian-blended
        #    ε, one step for all the latent
        mark = self._sync()
        batches = [self._prepare_batch(batch, text) for batch in self._tile_batches(conditions)]
        for index, timestep in enumerate(timesteps):
            model_input = noise_scheduler.scale_model_input(latents, timestep)
            if len(conditions) == 1:
                noise_pred = self._predict_noise_tiles(
                    [model_input], timestep, batches[0], guidance_scale, conditioning_scale
                )[0].float()
            else:
                noise_pred = torch.zeros_like(latents, dtype=torch.float32)
                for batch in batches:
                    tile_inputs = [
                        model_input[..., c.tile.slices[0], c.tile.slices[1]] for c in batch.tiles
                    ]
                    tile_preds = self._predict_noise_tiles(
                        tile_inputs, timestep, batch, guidance_scale, conditioning_scale
                    )
                    for condition, tile_pred in zip(batch.tiles, tile_preds, strict=True):
                        rows, cols = condition.tile.slices
                        assert condition.weights is not None
                        noise_pred[..., rows, cols] += tile_pred.float() * condition.weights
                noise_pred = noise_pred / total_weight
            latents = noise_scheduler.step(
                noise_pred, timestep, latents.float(), **step_kwargs
            ).prev_sample
            latents = latents.to(dtype)
            notify("denoise", index + 1, len(timesteps))
        timings["denoise"] = self._sync() - mark

        # 7. decode, crop to exactly scale x input, colour fix
        notify("decode", 0, 1)
        mark = self._sync()
        decoded = tiled_vae_decode(
            self.vae, latents.to(self.vae.dtype), tile=vae_tile, overlap=vae_tile // 8
        )
        decoded = decoded[..., :out_h, :out_w].float()
        decoded = apply_color_fix(decoded, reference, color_fix).clamp(-1.0, 1.0)
        result = (decoded + 1.0) / 2.0
        images: list[Image.Image] | torch.Tensor
        if output_type == "pt":
            images = result.cpu()
        else:
            array = (result[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
            images = [Image.fromarray(array)]
        timings["decode"] = self._sync() - mark
        notify("decode", 1, 1)
        return SpaSemSRPipelineOutput(images=images, timings=timings, prompt=prompt)
