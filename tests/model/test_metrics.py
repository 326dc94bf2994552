"""Tests of PSNR / SSIM (closed forms and scikit-image) and of the learned-metric registry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from model.configs.tiny_tokenizer import write_tiny_clip_tokenizer
from model.evaluation.metrics import (
    LEARNED_METRICS,
    LPIPS,
    LearnedMetricPaths,
    LPIPSNetwork,
    load_learned_metrics,
    psnr,
    psnr_ssim_y_batch,
    rgb_to_y,
    ssim,
)


def _random_image(seed: int, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (*shape, 3)).astype(np.float64)
    # Smooth it a little so SSIM is neither ~0 nor ~1.
    base = (base + np.roll(base, 1, axis=0) + np.roll(base, 1, axis=1)) / 3
    return base.round().astype(np.uint8)


def _noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = image.astype(np.float64) + rng.normal(0.0, sigma, image.shape)
    return np.clip(noisy.round(), 0, 255).astype(np.uint8)


def _y_numpy(image: np.ndarray) -> np.ndarray:
    """The Y channel computed independently in numpy (MATLAB rgb2ycbcr coefficients)."""
    rgb = image.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _skimage_ssim(a: np.ndarray, b: np.ndarray, **kwargs: object) -> float:
    return float(
        structural_similarity(  # type: ignore[no-untyped-call]
            a,
            b,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            **kwargs,
        )
    )


# --- PSNR / SSIM ------------------------------------------------------------------------------


def test_y_channel_endpoints() -> None:
    white, black = torch.full((3, 1, 1), 255.0), torch.zeros(3, 1, 1)
    assert float(rgb_to_y(white)) == pytest.approx(235.0)
    assert float(rgb_to_y(black)) == pytest.approx(16.0)


def test_identical_images() -> None:
    image = _random_image(0)
    assert psnr(image, image, crop_border=4) == math.inf
    assert ssim(image, image, crop_border=4) == pytest.approx(1.0)
    pil = Image.fromarray(image)
    assert ssim(pil, pil.copy(), crop_border=0, y_channel=False) == pytest.approx(1.0)


def test_psnr_of_a_known_uniform_offset() -> None:
    image = np.full((32, 32, 3), 100, dtype=np.uint8)
    shifted = image + 4
    # A gray offset d moves Y by d * 219 / 255 (the RGB weights sum to 219).
    expected = 20 * math.log10(255.0 / (4 * 219.0 / 255.0))
    assert psnr(shifted, image, crop_border=4) == pytest.approx(expected, abs=1e-9)
    assert psnr(shifted, image, crop_border=0, y_channel=False) == pytest.approx(
        20 * math.log10(255.0 / 4), abs=1e-9
    )


def test_psnr_of_a_known_noise_level() -> None:
    image = np.full((128, 128), 128, dtype=np.uint8)  # gray: Y sees the noise unscaled
    noisy = _noisy(image, 5.0, seed=1)
    expected = 20 * math.log10(255.0 / 5.0)
    assert psnr(noisy, image, crop_border=0) == pytest.approx(expected, abs=0.15)


def test_ssim_orders_noise_levels() -> None:
    image = _random_image(2)
    values = [ssim(_noisy(image, s, seed=3), image, crop_border=4) for s in (2.0, 10.0, 40.0)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


@pytest.mark.parametrize(("seed", "crop", "sigma"), [(0, 0, 3.0), (1, 2, 12.0), (2, 4, 30.0)])
def test_psnr_ssim_match_scikit_image_on_y(seed: int, crop: int, sigma: float) -> None:
    reference = _random_image(seed)
    image = _noisy(reference, sigma, seed + 10)
    y_ref, y_img = _y_numpy(reference), _y_numpy(image)
    if crop:
        y_ref, y_img = y_ref[crop:-crop, crop:-crop], y_img[crop:-crop, crop:-crop]
    assert psnr(image, reference, crop_border=crop) == pytest.approx(
        peak_signal_noise_ratio(y_ref, y_img, data_range=255),  # type: ignore[no-untyped-call]
        abs=1e-9,
    )
    assert ssim(image, reference, crop_border=crop) == pytest.approx(
        _skimage_ssim(y_ref, y_img), abs=1e-9
    )


def test_rgb_ssim_matches_scikit_image_channel_mean() -> None:
    reference = _random_image(5)
    image = _noisy(reference, 15.0, 6)
    assert ssim(image, reference, crop_border=0, y_channel=False) == pytest.approx(
        _skimage_ssim(reference, image, channel_axis=2), abs=1e-9
    )


def test_border_crop_ignores_the_border() -> None:
    reference = _random_image(7)
    image = reference.copy()
    image[:3] = 0
    image[:, -3:] = 255
    assert psnr(image, reference, crop_border=2) < 40
    assert psnr(image, reference, crop_border=3) == math.inf


def test_batch_version_agrees_with_the_image_version() -> None:
    references = [_random_image(s) for s in (8, 9)]
    images = [_noisy(r, 8.0, s) for r, s in zip(references, (10, 11), strict=True)]

    def stack(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    p, s = psnr_ssim_y_batch(stack(images), stack(references), crop_border=4)
    for i in range(2):
        assert float(p[i]) == pytest.approx(psnr(images[i], references[i], crop_border=4))
        assert float(s[i]) == pytest.approx(ssim(images[i], references[i], crop_border=4))


def test_mismatched_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(_random_image(0), _random_image(0, (40, 40)), crop_border=0)
    with pytest.raises(ValueError, match="leaves nothing"):
        ssim(_random_image(0), _random_image(1), crop_border=20)


# --- learned metrics --------------------------------------------------------------------------


def test_without_weights_every_learned_metric_is_skipped_with_a_reason() -> None:
    metrics, statuses = load_learned_metrics(LearnedMetricPaths())
    assert metrics == {}
    assert [s.name for s in statuses] == list(LEARNED_METRICS)
    assert all(not s.available and s.reason for s in statuses)
    reasons = {s.name: s.reason for s in statuses}
    assert "CLIP" in reasons["clipiqa"] and "LPIPS" in reasons["lpips"]
    assert "MUSIQ" in reasons["musiq"] and "MANIQA" in reasons["maniqa"]


def _write_lpips_weights(directory: Path) -> tuple[Path, Path]:
    """Seeded random AlexNet trunk (torchvision keys) and non-negative LPIPS linear weights."""
    torch.manual_seed(0)
    network = LPIPSNetwork("alex")
    trunk = {f"features.{k}": v for k, v in network.net.features.state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(2, 2)  # a full torchvision file has a head too
    backbone = directory / "alexnet.pth"
    torch.save(trunk, backbone)
    linear = directory / "lpips_alex.pth"
    torch.save(
        {
            f"lin{i}.model.1.weight": torch.rand(1, width, 1, 1)
            for i, width in enumerate(network.net.channels)
        },
        linear,
    )
    return backbone, linear


def test_lpips_from_local_files(tmp_path: Path) -> None:
    backbone, linear = _write_lpips_weights(tmp_path)
    metrics, statuses = load_learned_metrics(
        LearnedMetricPaths(lpips_backbone=backbone, lpips_linear=linear), names=("lpips",)
    )
    assert statuses[0].available
    lpips = metrics["lpips"]
    assert isinstance(lpips, LPIPS) and not lpips.higher_is_better
    reference = Image.fromarray(_random_image(3, (64, 64)))
    assert lpips(reference, reference) == pytest.approx(0.0, abs=1e-7)
    near = lpips(Image.fromarray(_noisy(np.asarray(reference), 5.0, 1)), reference)
    far = lpips(Image.fromarray(_noisy(np.asarray(reference), 60.0, 1)), reference)
    assert 0.0 < near < far
    with pytest.raises(ValueError, match="full-reference"):
        lpips(reference)


def test_lpips_with_wrong_linear_file_is_skipped(tmp_path: Path) -> None:
    backbone, _ = _write_lpips_weights(tmp_path)
    wrong = tmp_path / "wrong.pth"
    torch.save({"something": torch.zeros(1)}, wrong)
    metrics, statuses = load_learned_metrics(
        LearnedMetricPaths(lpips_backbone=backbone, lpips_linear=wrong), names=("lpips",)
    )
    assert metrics == {} and not statuses[0].available
    assert "lin0.model.1.weight" in statuses[0].reason


def _write_tiny_clip(directory: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    tokenizer_dir = write_tiny_clip_tokenizer(directory, words=["good", "bad", "photo"])
    from model.configs.tiny_tokenizer import load_tiny_clip_tokenizer

    tokenizer = load_tiny_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    return directory


def test_clipiqa_from_a_local_clip_folder(tmp_path: Path) -> None:
    folder = _write_tiny_clip(tmp_path / "clip")
    metrics, statuses = load_learned_metrics(
        LearnedMetricPaths(clip_model=folder), names=("clipiqa", "musiq")
    )
    assert [s.available for s in statuses] == [True, False]
    clipiqa = metrics["clipiqa"]
    assert clipiqa.higher_is_better and not clipiqa.needs_reference
    image = Image.fromarray(_random_image(4, (50, 70)))
    flat = Image.new("RGB", (50, 70), (128, 128, 128))
    score = clipiqa(image)
    assert 0.0 < score < 1.0
    assert clipiqa(image) == score  # deterministic
    assert clipiqa(flat) != pytest.approx(score, abs=1e-6)


def test_missing_clip_folder_is_reported(tmp_path: Path) -> None:
    _, statuses = load_learned_metrics(
        LearnedMetricPaths(clip_model=tmp_path / "absent"), names=("clipiqa",)
    )
    assert not statuses[0].available and "does not exist" in statuses[0].reason
