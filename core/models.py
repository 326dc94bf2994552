"""The models a service can serve, by name: the catalogue both the API and the workers share.

Names are a closed set so that they can be form enums, queue names and metric labels (a bounded
label set, DESIGN 2.3). Each model has its own queues, one per priority (DESIGN 2.1b): a worker
serves the queues of the models it holds warm, a GPU pool can be dedicated to one model, and
autoscaling reads one model's queues.

Which model a request gets when it names none (:func:`default_model`): the configured
``SPASEMSR_MODEL__DEFAULT``; otherwise ``spasemsr`` when a SpaSemSR pipeline folder is configured
(``SPASEMSR_MODEL__PATH``, a trained one), else ``realesrgan-x4plus``, the best model with trained
weights that every installation has (the tiny SpaSemSR demo pipeline is untrained).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings


class ModelName(StrEnum):
    SPASEMSR = "spasemsr"
    REALESRGAN_X4PLUS = "realesrgan-x4plus"
    REALESRGAN_X4PLUS_ANIME = "realesrgan-x4plus-anime"
    REALESR_ANIMEVIDEOV3 = "realesr-animevideov3"
    LANCZOS = "lanczos"


ALL_MODELS: tuple[ModelName, ...] = tuple(ModelName)


def default_model(settings: Settings) -> ModelName:
    if settings.model.default is not None:
        return ModelName(settings.model.default)
    if settings.model.path is not None:
        return ModelName.SPASEMSR
    return ModelName.REALESRGAN_X4PLUS


def worker_models(settings: Settings) -> tuple[ModelName, ...]:
    """The models one worker process holds warm (``SPASEMSR_WORKER__MODELS``; empty = all)."""
    if not settings.worker.models:
        return ALL_MODELS
    return tuple(dict.fromkeys(ModelName(name) for name in settings.worker.models))
