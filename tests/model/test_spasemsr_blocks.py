"""SpaSemSR's blocks on real diffusers / transformers classes at tiny size (no downloads)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from model.blocks.attention import INPUTS_KEY, SpaSemSRAttentionInputs, cross_attention_sites
from model.blocks.controlnet import SpatialSemanticControlNet
from model.blocks.encoders import ImageEncoder, semantic_features, visual_guidance
from model.blocks.position import FourierPositionEncoder
from model.blocks.text import (
    aligned_token_add,
    box_embeddings_at_token_scale,
    tag_prompt,
    tag_token_indices,
)
from model.blocks.unet_attention import SpaSemSRUNetAttention
from model.configs.spasemsr import build_tiny_pipeline
from model.pipeline.diffusion import SpaSemSRPipeline
from tests.model.perturb import perturb_trained_blocks


def _inputs(pipe: SpaSemSRPipeline, batch: int = 2, size: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    dim = pipe.text_encoder.config.hidden_size
    channels = pipe.controlnet.config.conditioning_channels
    return {
        "sample": torch.randn(batch, 4, size, size, generator=generator),
        "text": torch.randn(batch, 77, dim, generator=generator),
        "spatial": torch.randn(batch, 77, dim, generator=generator),
        "guidance": torch.randn(batch, channels, size, size, generator=generator),
    }


# --- spatial-aware text --------------------------------------------------------------------------


def test_position_encoder_is_fourier_features_of_the_box() -> None:
    encoder = FourierPositionEncoder(1024)
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]])
    features = encoder(boxes)
    assert features.shape == (2, 1024)
    assert list(encoder.parameters()) == []  # frozen, no weights
    # layout: coordinate x frequency x (sin, cos)
    freqs = 100.0 ** (torch.arange(128) / 128)
    expected_x_lu = torch.stack([(0.1 * freqs).sin(), (0.1 * freqs).cos()], dim=-1).flatten()
    torch.testing.assert_close(features[0, :256], expected_x_lu)
    with pytest.raises(ValueError):
        FourierPositionEncoder(30)


def test_tag_token_indices_cover_all_sub_word_tokens(tiny_pipeline: SpaSemSRPipeline) -> None:
    tokenizer = tiny_pipeline.tokenizer
    tags = ["sky", "seagull", "sand"]
    text, spans = tag_prompt(tags)
    assert text == "sky, seagull, sand"
    encoding = tokenizer(text, return_offsets_mapping=True)
    indices = tag_token_indices(encoding.offset_mapping, spans)
    tokens = tokenizer.convert_ids_to_tokens(encoding.input_ids)
    for tag, tag_indices in zip(tags, indices, strict=True):
        assert "".join(tokens[i] for i in tag_indices).replace("</w>", "") == tag
    assert len(indices[1]) > 1  # "seagull" is several sub-word tokens in the tiny vocabulary


def test_aligned_token_add_changes_only_the_tag_tokens(tiny_pipeline: SpaSemSRPipeline) -> None:
    conditioner = tiny_pipeline.text_conditioner
    tags = ("sky", "seagull", "sand", "sky")
    boxes = ((0.0, 0.0, 1.0, 0.4), (0.3, 0.2, 0.4, 0.3), (0.0, 0.6, 1.0, 1.0), (0.5, 0.0, 0.9, 0.2))
    text, spans = tag_prompt(tags)
    plain = conditioner.encode(text)
    spatial = conditioner.encode_spatial(tags, boxes)
    assert spatial.shape == plain.shape

    encoding = tiny_pipeline.tokenizer(
        text, return_offsets_mapping=True, padding="max_length", max_length=77
    )
    indices = tag_token_indices(encoding.offset_mapping, spans)
    raw = conditioner.position_encoder(torch.tensor(boxes))
    box_embeddings = box_embeddings_at_token_scale(plain, indices, raw)[0]
    difference = spatial[0] - plain[0]
    tag_tokens = {i for tag_indices in indices for i in tag_indices}
    for position in range(77):
        if position not in tag_tokens:
            assert torch.equal(difference[position], torch.zeros_like(difference[position])), (
                position
            )
    for tag_indices, box_embedding, direction in zip(indices, box_embeddings, raw, strict=True):
        token_norm = plain[0, tag_indices].norm(dim=-1).mean()
        # the box's Fourier direction, at the norm of the tag's own tokens
        torch.testing.assert_close(box_embedding.norm(), token_norm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            torch.nn.functional.cosine_similarity(box_embedding, direction, dim=0),
            torch.tensor(1.0),
        )
        for position in tag_indices:
            torch.testing.assert_close(difference[position], box_embedding, atol=1e-5, rtol=1e-5)


def test_aligned_token_add_rejects_mismatched_boxes() -> None:
    with pytest.raises(ValueError):
        aligned_token_add(torch.zeros(1, 5, 8), [[1], [2]], torch.zeros(3, 8))


def test_tags_beyond_the_token_window_are_dropped_with_their_boxes(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    tags = [f"tag{i}" for i in range(60)]
    boxes = [(0.0, 0.0, 1.0, 1.0)] * 60
    kept_tags, kept_boxes = tiny_pipeline.text_conditioner.fit_tags(tags, boxes)
    assert 0 < len(kept_tags) < 60 and len(kept_tags) == len(kept_boxes)
    assert kept_tags == tags[: len(kept_tags)]
    text, _ = tag_prompt(kept_tags)
    assert len(tiny_pipeline.tokenizer(text).input_ids) <= 77
    embedding = tiny_pipeline.text_conditioner.encode_spatial(tags, boxes)
    assert embedding.shape == (1, 77, 32)


# --- zero-initialised additions ------------------------------------------------------------------


def test_unet_with_fresh_additions_predicts_as_the_stock_unet(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    unet = tiny_pipeline.unet
    stock = UNet2DConditionModel.from_config(unet.config).eval()
    stock.load_state_dict(unet.state_dict())  # the additions add no keys to the UNet's state dict
    inputs = _inputs(tiny_pipeline)
    semantic = tuple(
        torch.randn(2, channels, 16 // 2**level, 16 // 2**level)
        for level, channels in enumerate(unet.config.block_out_channels)
    )
    attention = SpaSemSRAttentionInputs(spatial_text=inputs["spatial"], semantic=semantic)
    with torch.no_grad():
        ours = unet(
            inputs["sample"],
            500,
            encoder_hidden_states=inputs["text"],
            cross_attention_kwargs={INPUTS_KEY: attention},
        ).sample
        reference = stock(inputs["sample"], 500, encoder_hidden_states=inputs["text"]).sample
    assert (ours - reference).abs().max().item() <= 1e-5


def test_unet_additions_take_effect_once_trained(tiny_pipeline: SpaSemSRPipeline) -> None:
    """The processors are wired: perturbing the zero outputs changes the prediction."""
    unet = copy.deepcopy(tiny_pipeline.unet)
    additions = copy.deepcopy(tiny_pipeline.unet_attention)
    additions.install(unet)
    inputs = _inputs(tiny_pipeline)
    semantic = tuple(
        torch.randn(2, channels, 16 // 2**level, 16 // 2**level)
        for level, channels in enumerate(unet.config.block_out_channels)
    )
    kwargs = {
        INPUTS_KEY: SpaSemSRAttentionInputs(spatial_text=inputs["spatial"], semantic=semantic)
    }
    with torch.no_grad():
        before = unet(
            inputs["sample"],
            10,
            encoder_hidden_states=inputs["text"],
            cross_attention_kwargs=kwargs,
        ).sample
        for name, parameter in additions.named_parameters():
            if "to_out_img" in name:
                parameter.normal_(std=0.1)
        image_only = unet(
            inputs["sample"],
            10,
            encoder_hidden_states=inputs["text"],
            cross_attention_kwargs=kwargs,
        ).sample
        for name, parameter in additions.named_parameters():
            if "to_out_spa" in name:
                parameter.normal_(std=0.1)
        both = unet(
            inputs["sample"],
            10,
            encoder_hidden_states=inputs["text"],
            cross_attention_kwargs=kwargs,
        ).sample
    assert not torch.allclose(before, image_only)
    assert not torch.allclose(image_only, both)


def test_unet_additions_cover_encoder_and_decoder(tiny_pipeline: SpaSemSRPipeline) -> None:
    sites = tiny_pipeline.unet_attention.config.sites
    assert {site["name"].split(".")[0] for site in sites} == {"down_blocks", "up_blocks"}
    for site in sites:
        decoder = site["name"].startswith("up_blocks")
        assert (site["image_channels"] is not None) == decoder
        if decoder:
            assert (
                site["image_channels"]
                == tiny_pipeline.unet.config.block_out_channels[site["level"]]
            )


def test_unet_additions_save_and_load_as_their_own_weights(
    tiny_pipeline: SpaSemSRPipeline, tmp_path: Path
) -> None:
    additions = copy.deepcopy(tiny_pipeline.unet_attention)
    with torch.no_grad():
        for parameter in additions.parameters():
            parameter.normal_()
    additions.save_pretrained(tmp_path / "unet_attention")
    loaded = SpaSemSRUNetAttention.from_pretrained(tmp_path / "unet_attention")
    assert loaded.config.sites == additions.config.sites
    for (name, a), (_, b) in zip(
        additions.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    stock_keys = set(UNet2DConditionModel.from_config(tiny_pipeline.unet.config).state_dict())
    assert set(tiny_pipeline.unet.state_dict()) == stock_keys


def test_fresh_controlnet_residuals_are_exactly_zero(tiny_pipeline: SpaSemSRPipeline) -> None:
    controlnet = tiny_pipeline.controlnet
    inputs = _inputs(tiny_pipeline)
    with torch.no_grad():
        output = controlnet(
            inputs["sample"],
            500,
            spatial_text=inputs["spatial"],
            degradation_text=inputs["text"],
            guidance=inputs["guidance"],
        )
    for residual in (*output.down_block_res_samples, output.mid_block_res_sample):
        assert torch.count_nonzero(residual) == 0
    channels = controlnet.config.block_out_channels
    assert [e.shape for e in output.embeddings] == [
        (2, c, 16 // 2**level, 16 // 2**level) for level, c in enumerate(channels)
    ]
    assert all(e.abs().sum() > 0 for e in output.embeddings)


def test_controlnet_starts_as_a_copy_of_the_unet_encoder(tiny_pipeline: SpaSemSRPipeline) -> None:
    unet, controlnet = tiny_pipeline.unet, tiny_pipeline.controlnet
    for name, tensor in unet.down_blocks.state_dict().items():
        assert torch.equal(controlnet.down_blocks.state_dict()[name], tensor), name
    unet_modules = dict(unet.named_modules())
    sites = cross_attention_sites(controlnet, ("down_blocks.", "mid_block."))
    assert len(sites) == len(controlnet.spatial_semantic) > 0
    for name, _ in sites:
        weights = controlnet.site(name)
        assert torch.equal(weights.degradation_attn.to_k.weight, unet_modules[name].to_k.weight)
        assert torch.count_nonzero(weights.fusion_attn.to_out[0].weight) == 0


def test_controlnet_guidance_and_degradation_text_take_effect(
    tiny_pipeline: SpaSemSRPipeline,
) -> None:
    controlnet = copy.deepcopy(tiny_pipeline.controlnet)
    with torch.no_grad():
        controlnet.condition_fusion.proj.weight.normal_(std=0.1)
        for weights in controlnet.spatial_semantic.values():
            weights.fusion_attn.to_out[0].weight.normal_(std=0.1)
    inputs = _inputs(tiny_pipeline)

    def embeddings(**changes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = {
            "spatial_text": inputs["spatial"],
            "degradation_text": inputs["text"],
            "guidance": inputs["guidance"],
        }
        args.update(changes)
        with torch.no_grad():
            result: tuple[torch.Tensor, ...] = controlnet(inputs["sample"], 500, **args).embeddings
        return result

    reference = embeddings()
    assert not torch.allclose(embeddings(guidance=inputs["guidance"] * 0)[0], reference[0])
    assert not torch.allclose(embeddings(degradation_text=inputs["text"] * 0)[0], reference[0])
    assert not torch.allclose(embeddings(spatial_text=inputs["spatial"] * 0)[0], reference[0])


def test_controlnet_save_load_round_trip(tmp_path: Path) -> None:
    """With non-zero zero-convolutions and fusion, so that a lost one would show."""
    pipeline = perturb_trained_blocks(build_tiny_pipeline(seed=0), seed=1)
    pipeline.controlnet.save_pretrained(tmp_path / "controlnet")
    loaded = SpatialSemanticControlNet.from_pretrained(tmp_path / "controlnet")
    inputs = _inputs(pipeline, batch=1)
    kwargs = {
        "spatial_text": inputs["spatial"][:1],
        "degradation_text": inputs["text"][:1],
        "guidance": inputs["guidance"][:1],
    }
    with torch.no_grad():
        a = pipeline.controlnet(inputs["sample"], 3, **kwargs)
        b = loaded(inputs["sample"], 3, **kwargs)
        fresh = build_tiny_pipeline(seed=0).controlnet(inputs["sample"], 3, **kwargs)
    outputs = [
        (*x.down_block_res_samples, x.mid_block_res_sample, *x.embeddings) for x in (a, b, fresh)
    ]
    for x, y in zip(outputs[0], outputs[1], strict=True):
        assert torch.equal(x, y)
    assert all(torch.count_nonzero(residual) > 0 for residual in a.down_block_res_samples)
    assert not torch.equal(outputs[0][0], outputs[2][0])


# --- visual guidance -----------------------------------------------------------------------------


def test_image_encoder_starts_at_the_scaled_vae_latent(tiny_pipeline: SpaSemSRPipeline) -> None:
    vae = tiny_pipeline.vae
    encoder = ImageEncoder.from_vae(vae)
    image = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ours = encoder(image)
        latent = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
    assert ours.shape == (1, 4, 8, 6)
    torch.testing.assert_close(ours, latent, atol=1e-5, rtol=1e-4)


def test_semantic_features_follow_the_latent_grid(tiny_pipeline: SpaSemSRPipeline) -> None:
    image = torch.rand(2, 3, 96, 40) * 2 - 1
    with torch.no_grad():
        features = semantic_features(tiny_pipeline.semantic_encoder, image, size=(12, 5))
        guidance = visual_guidance(
            tiny_pipeline.image_encoder, tiny_pipeline.semantic_encoder, image
        )
    sam_channels = tiny_pipeline.semantic_encoder.config.output_channels
    assert features.shape == (2, sam_channels, 12, 5)
    assert guidance.shape == (2, 4 + sam_channels, 12, 5)
    assert guidance.shape[1] == tiny_pipeline.controlnet.config.conditioning_channels
