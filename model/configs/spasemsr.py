"""SpaSemSR configurations (``tiny``, ``sd2``) and builders of pipelines with seeded random weights.

* ``sd2``: the full-size shapes of DESIGN 1.1 -- SD-2-base UNet / VAE / OpenCLIP-H text tower
  (1024-d), SAM ViT-B semantic encoder (256 channels at 64x64 for a 1024-px input). Real weights
  come through :mod:`model.configs.assemble`; :func:`build_pipeline` with this configuration gives
  random weights (benchmarks).
* ``tiny``: the same classes at toy size (CPU, well under a second per image) for tests and the
  demo, with a byte-level BPE tokenizer the project writes itself (nothing is downloaded).

:func:`ensure_demo_pipeline` builds the tiny pipeline once, saves it (marked untrained) and lets
callers load it back through the same ``from_pretrained`` code as real weights.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SamVisionConfig,
    SamVisionModel,
)

from model.blocks.controlnet import SpatialSemanticControlNet
from model.blocks.encoders import ImageEncoder
from model.blocks.text import DEFAULT_NEGATIVE_PROMPT, compose_caption
from model.blocks.unet_attention import SpaSemSRUNetAttention
from model.configs.tiny_tokenizer import write_tiny_clip_tokenizer
from model.pipeline.diffusion import SpaSemSRPipeline

logger = logging.getLogger(__name__)

SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
"""SD-2-base's noise schedule (its ``scheduler/scheduler_config.json``)."""

TINY_WORDS = [
    "sky",
    "water",
    "sand",
    "cliff",
    "sea",
    "beach",
    "tree",
    "grass",
    "building",
    "person",
    "people",
    "dog",
    "cat",
    "car",
    "road",
    "mountain",
    "flower",
    "bird",
    "house",
    "window",
    "wall",
    "cloud",
    "face",
    "hair",
    "rock",
    "river",
    "field",
    "street",
    "boat",
    "animal",
    "plant",
]


@dataclass(frozen=True)
class SpaSemSRConfiguration:
    """Architecture hyper-parameters of every component (diffusers / transformers constructor
    arguments)."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    semantic_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULER))


TINY = SpaSemSRConfiguration(
    name="tiny",
    unet={
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "norm_num_groups": 32,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 16, 32, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 128,
    },
    text_encoder={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "gelu",
    },
    semantic_encoder={
        "hidden_size": 32,
        "output_channels": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 8,
        "window_size": 4,
        "global_attn_indexes": (1,),
        "mlp_dim": 64,
        "num_pos_feats": 16,
        "initializer_range": 0.02,
    },
)

SD2 = SpaSemSRConfiguration(
    name="sd2",
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        "norm_num_groups": 32,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    text_encoder={
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "projection_dim": 512,
        "hidden_act": "gelu",
    },
    semantic_encoder={
        "hidden_size": 768,
        "output_channels": 256,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 1024,
        "patch_size": 16,
        "window_size": 14,
        "global_attn_indexes": (2, 5, 8, 11),
        "mlp_dim": 3072,
        "initializer_range": 0.02,
    },
)

CONFIGURATIONS = {config.name: config for config in (TINY, SD2)}


def tiny_tokenizer() -> CLIPTokenizer:
    """The project's own small CLIP BPE tokenizer, learnt on tags, captions and negative prompt."""
    words = TINY_WORDS + compose_caption(TINY_WORDS).replace(",", " ").replace(".", " ").split()
    words += DEFAULT_NEGATIVE_PROMPT.replace(",", " ").split()
    with tempfile.TemporaryDirectory() as directory:
        write_tiny_clip_tokenizer(Path(directory), words=words * 2, num_merges=300)
        tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(directory)
    return tokenizer


def build_pipeline(
    configuration: SpaSemSRConfiguration,
    *,
    seed: int = 0,
    tokenizer: CLIPTokenizer | None = None,
) -> SpaSemSRPipeline:
    """A pipeline of ``configuration``'s shapes with weights drawn from ``seed`` (marked untrained).

    SpaSemSR's blocks are initialised as a real run would start them: the ControlNet and the
    image encoder from the (here random) UNet and VAE, the added attention with zero outputs.
    """
    tokenizer = tokenizer or tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configuration.unet)
        vae = AutoencoderKL(**configuration.vae)
        text_config = {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **configuration.text_encoder,
        }
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        semantic_encoder = SamVisionModel(SamVisionConfig(**configuration.semantic_encoder))
        return assemble_components(
            configuration=configuration.name,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            semantic_encoder=semantic_encoder,
            scheduler=DDPMScheduler(**configuration.scheduler),
        )


def assemble_components(
    *,
    configuration: str,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    semantic_encoder: SamVisionModel,
    scheduler: Any,
    controlnet: SpatialSemanticControlNet | None = None,
    unet_attention: SpaSemSRUNetAttention | None = None,
    image_encoder: ImageEncoder | None = None,
    trained: bool = False,
) -> SpaSemSRPipeline:
    """A pipeline from loaded components; SpaSemSR blocks not given are freshly initialised."""
    image_encoder = image_encoder or ImageEncoder.from_vae(vae)
    conditioning_channels = (
        image_encoder.config["latent_channels"] + semantic_encoder.config.output_channels
    )
    controlnet = controlnet or SpatialSemanticControlNet.from_unet(
        unet, conditioning_channels=conditioning_channels
    )
    unet_attention = unet_attention or SpaSemSRUNetAttention.from_unet(unet)
    for frozen in (vae, text_encoder, unet):
        frozen.requires_grad_(False)
    pipeline = SpaSemSRPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        unet_attention=unet_attention.eval(),
        controlnet=controlnet.eval(),
        image_encoder=image_encoder.eval(),
        semantic_encoder=semantic_encoder.eval(),
        scheduler=scheduler,
        configuration=configuration,
        trained=trained,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_tiny_pipeline(seed: int = 0) -> SpaSemSRPipeline:
    """The ``tiny`` pipeline with weights drawn from ``seed``: the same ``seed`` gives the same
    weights."""
    return build_pipeline(TINY, seed=seed)


def ensure_demo_pipeline(directory: Path, *, seed: int = 0) -> Path:
    """Make sure ``directory`` holds a saved tiny pipeline (untrained, seeded weights); return it.

    Idempotent: a folder that already holds a pipeline is left as it is. Safe when several
    processes race: each builds into a temporary sibling folder and renames it into place; the
    losers discard theirs.
    """
    directory = Path(directory)
    if (directory / "model_index.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        build_tiny_pipeline(seed).save_pretrained(staging)
        try:
            staging.rename(directory)
            logger.info("saved the tiny SpaSemSR demo pipeline (untrained) to %s", directory)
        except OSError:
            if not (directory / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
