"""Assemble a full-size SpaSemSR pipeline folder from component folders (DESIGN 1.6).

The frozen parts come from their own libraries' layouts: an SD-2(-base) diffusers pipeline folder
or hub id (``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``) and a transformers
SAM folder or hub id (``SamModel`` or ``SamVisionModel``; only the vision encoder is kept).
SpaSemSR's own blocks (``controlnet``, ``unet_attention``, ``image_encoder`` and optionally a
fine-tuned ``semantic_encoder``) come from a trained blocks folder, or are freshly initialised
from the UNet, VAE and SAM weights, in which case the folder is marked untrained. The result
loads with ``SpaSemSRPipeline.from_pretrained`` / ``SpaSemSRUpscaler.from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextModel, CLIPTokenizer, SamVisionModel

from model.blocks.controlnet import SpatialSemanticControlNet
from model.blocks.encoders import ImageEncoder
from model.blocks.unet_attention import SpaSemSRUNetAttention
from model.configs.spasemsr import assemble_components

logger = logging.getLogger(__name__)

BLOCKS = ("controlnet", "unet_attention", "image_encoder")
"""The trained SpaSemSR blocks a blocks folder must hold (``semantic_encoder`` is optional)."""


def _blocks_trained(blocks: Path) -> bool:
    """A blocks folder is trained unless its ``model_index.json`` says ``"trained": false``."""
    index = blocks / "model_index.json"
    if index.is_file():
        return bool(json.loads(index.read_text()).get("trained", True))
    return True


def assemble_pipeline(
    output: str | Path,
    *,
    base: str | Path,
    sam: str | Path | None = None,
    blocks: str | Path | None = None,
    configuration: str = "sd2",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a SpaSemSR pipeline folder at ``output`` and return its path.

    Args:
        output: the pipeline folder to create (written to a temporary sibling, then renamed into
        place).
        base: SD-2 diffusers pipeline folder or hub id, for ``vae``, ``text_encoder``,
        ``tokenizer``,
            ``unet`` and ``scheduler``.
        sam: transformers SAM folder or hub id for the semantic encoder; may be omitted when
        ``blocks``
            holds a ``semantic_encoder``.
        blocks: folder with trained SpaSemSR blocks (``controlnet/``, ``unet_attention/``,
            ``image_encoder/``, optional ``semantic_encoder/``), e.g. a training output or another
            pipeline folder. ``None`` initialises fresh blocks (ControlNet and image encoder from
            the UNet
            and VAE, zero-initialised added attention) and marks the folder untrained.
        configuration: the configuration name recorded in the folder (shown on the model card).
        dtype: dtype the weights are loaded in and saved as.
        overwrite: replace an existing ``output`` folder instead of refusing.

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        ValueError: no source for the semantic encoder, or ``blocks`` lacks a block.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True to replace it")
    blocks_dir = Path(blocks) if blocks is not None else None
    if blocks_dir is not None:
        missing = [name for name in BLOCKS if not (blocks_dir / name).is_dir()]
        if missing:
            raise ValueError(f"blocks folder {blocks_dir} lacks {missing}")
    sam_source: str | Path | None = sam
    if blocks_dir is not None and (blocks_dir / "semantic_encoder").is_dir():
        sam_source = blocks_dir / "semantic_encoder"
    if sam_source is None:
        raise ValueError("give a SAM folder (sam=...) or a blocks folder with a semantic_encoder")

    base = str(base)
    logger.info("loading SD components from %s and the semantic encoder from %s", base, sam_source)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    semantic_encoder = SamVisionModel.from_pretrained(str(sam_source), dtype=dtype)

    controlnet = unet_attention = image_encoder = None
    trained = False
    if blocks_dir is not None:
        controlnet = SpatialSemanticControlNet.from_pretrained(
            blocks_dir / "controlnet", dtype=dtype
        )
        unet_attention = SpaSemSRUNetAttention.from_pretrained(
            blocks_dir / "unet_attention", dtype=dtype
        )
        image_encoder = ImageEncoder.from_pretrained(blocks_dir / "image_encoder", dtype=dtype)
        trained = _blocks_trained(blocks_dir)
    pipeline = assemble_components(
        configuration=configuration,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        semantic_encoder=semantic_encoder,
        scheduler=scheduler,
        controlnet=controlnet,
        unet_attention=unet_attention,
        image_encoder=image_encoder,
        trained=trained,
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        pipeline.save_pretrained(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "assembled SpaSemSR pipeline (%s, trained=%s) at %s", configuration, trained, output
    )
    return output
