"""Recognising device faults without importing torch where it is not loaded."""

from __future__ import annotations

import sys

MIN_TILE_SIZE = 256

_FATAL_MARKERS = (
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "uncorrectable ecc",
    "cuda error: an illegal instruction",
    "cudaerrorlaunchfailure",
    "nccl error",
)


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower() and "cuda" in str(exc).lower()


def is_fatal_device_error(exc: BaseException) -> bool:
    """Errors after which the CUDA context is unusable: only a new process recovers."""
    text = str(exc).lower()
    return any(marker in text for marker in _FATAL_MARKERS)


def release_cached_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
