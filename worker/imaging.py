"""Turning any accepted upload into what an upscaler takes, and its output back into a file.

Behaviour for the odd cases (documented in the README):
- EXIF orientation is applied before upscaling; the output carries no EXIF orientation.
- ICC profiles are converted to sRGB (a damaged profile is ignored, the pixels kept as sRGB).
- CMYK, palette, 16-bit and grayscale inputs are upscaled as 8-bit RGB; grayscale inputs come
  back grayscale. 16-bit precision is not kept (the model works in 8-bit sRGB).
- Alpha (RGBA, LA, palette transparency) is upscaled separately with Lanczos and put back;
  JPEG output cannot carry it, so the image is flattened onto white there.
- Animated images: the first frame is upscaled.
- Inputs smaller than ``MIN_SIDE`` pixels on a side are edge-padded for the upscaler and the
  output cropped back, so a 1x1 image gives an exactly ``scale`` x ``scale`` result.
"""

from __future__ import annotations

import io
import logging
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps

from core.jobs import ImageFormat

logger = logging.getLogger(__name__)

MIN_SIDE = 16
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
# Encoding is part of every job's latency (bench/RESULTS.md, "Output encoding"):
# - PNG stays lossless; zlib's run-length strategy (Pillow's `compress_type`, the zlib strategy
#   constant) on the filtered rows is about twice as fast as level 4's default strategy and no
#   larger, on resized photographs (smooth, as upscaler outputs are) and on noise alike. With
#   Z_RLE the level barely matters; 1 is the cheapest. `optimize` stays off (much slower).
# - WebP `method` 2 is about 2x faster than 4 at the same quality setting, within 1.5 % of its
#   size and 0.15-0.45 dB of its PSNR.
# - JPEG (libjpeg-turbo) is already 4-7 ms per megapixel; `optimize` would cost two to three
#   times that for 2-8 % smaller files.
_SAVE_OPTIONS: dict[ImageFormat, dict[str, object]] = {
    ImageFormat.PNG: {"format": "PNG", "compress_level": 1, "compress_type": zlib.Z_RLE},
    ImageFormat.JPEG: {"format": "JPEG", "quality": 95, "subsampling": 0},
    ImageFormat.WEBP: {"format": "WEBP", "quality": 95, "method": 2},
}


@dataclass(frozen=True)
class DecodedImage:
    rgb: Image.Image
    alpha: Image.Image | None
    grayscale: bool


def decode(data: bytes) -> DecodedImage:
    with Image.open(io.BytesIO(data)) as opened:
        opened.seek(0)  # animated images: the first frame
        image = ImageOps.exif_transpose(opened)
        grayscale = opened.mode in _GRAY_MODES
        alpha = _alpha_of(image)
        rgb = _to_srgb(image)
    return DecodedImage(rgb=rgb, alpha=alpha, grayscale=grayscale)


def _alpha_of(image: Image.Image) -> Image.Image | None:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        alpha = image.getchannel("A")
        # A fully opaque alpha channel is no alpha at all: keep the output simple.
        return None if alpha.getextrema() == (255, 255) else alpha
    return None


def _to_srgb(image: Image.Image) -> Image.Image:
    if image.mode in {"I", "I;16", "I;16B", "I;16L"}:
        # 16-bit grayscale: scale to 8 bits rather than clip (Pillow's convert clips at 255).
        image = image.point(lambda value: value / 257).convert("L")
    icc = image.info.get("icc_profile")
    rgb = image.convert("RGB") if image.mode not in {"RGB", "CMYK"} else image
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(
                rgb, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError):
            logger.warning("ignoring an unusable ICC profile")
    return rgb.convert("RGB")


def pad_to_minimum(
    image: Image.Image, min_side: int = MIN_SIDE
) -> tuple[Image.Image, tuple[int, int]]:
    """Edge-pad a tiny RGB image; returns it with the original size to crop back to."""
    width, height = image.size
    if width >= min_side and height >= min_side:
        return image, (width, height)
    pixels = np.asarray(image)
    grow = ((0, max(0, min_side - height)), (0, max(0, min_side - width)), (0, 0))
    return Image.fromarray(np.pad(pixels, grow, mode="edge")), (width, height)


def finish(
    upscaled: Image.Image,
    decoded: DecodedImage,
    *,
    original_size: tuple[int, int],
    scale: int,
    output_format: ImageFormat,
) -> Image.Image:
    """Crop any padding away, put alpha back, restore grayscale, fit the output format."""
    size = (original_size[0] * scale, original_size[1] * scale)
    image = upscaled.crop((0, 0, *size)) if upscaled.size != size else upscaled
    if decoded.grayscale:
        image = image.convert("L")
    if decoded.alpha is None:
        return image
    alpha = decoded.alpha.resize(size, Image.Resampling.LANCZOS)
    if output_format is ImageFormat.JPEG:
        background = Image.new(image.mode, size, 255 if image.mode == "L" else (255, 255, 255))
        background.paste(image, mask=alpha)
        return background
    image = image.convert("LA" if image.mode == "L" else "RGBA")
    image.putalpha(alpha)
    return image


def save_options(output_format: ImageFormat) -> dict[str, object]:
    """The Pillow ``save`` options the worker encodes ``output_format`` with (benchmarks)."""
    return dict(_SAVE_OPTIONS[output_format])


def encode(image: Image.Image, output_format: ImageFormat) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **_SAVE_OPTIONS[output_format])  # type: ignore[arg-type]
    return buffer.getvalue()
