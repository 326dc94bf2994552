"""A sample photo-like image the project draws itself (nothing is ever downloaded)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFilter


def sample_image(width: int = 96, height: int = 64) -> Image.Image:
    """A small seaside-like scene: sky gradient, sun, sea with waves, sand, a cliff."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.45)
    shore = int(height * 0.75)
    for y in range(height):
        if y < horizon:
            t = y / max(1, horizon)
            color = (int(90 + 100 * t), int(150 + 70 * t), int(235 - 20 * t))
        elif y < shore:
            t = (y - horizon) / max(1, shore - horizon)
            wave = int(12 * math.sin(y * 1.7))
            color = (int(20 + 30 * t), int(90 + 40 * t + wave), int(150 + 30 * t + wave))
        else:
            color = (222, 196, 150)
        draw.line([(0, y), (width, y)], fill=color)
    draw.ellipse(
        [width * 0.68, height * 0.08, width * 0.82, height * 0.08 + width * 0.14],
        fill=(255, 236, 160),
    )
    draw.polygon(
        [
            (0, shore),
            (0, int(height * 0.2)),
            (width * 0.22, int(height * 0.35)),
            (width * 0.3, shore),
        ],
        fill=(110, 92, 72),
    )
    return image.filter(ImageFilter.GaussianBlur(0.6))
