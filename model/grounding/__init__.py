"""The grounding stage (DESIGN 1.1-1.3): DRM, tagger, detector and degradation-aware caption.

``SpaSemSRGrounder`` implements ``model.pipeline.prompt.Grounder``; the seeded toy version
used by tests and the embedded demo is built by ``model.configs.grounding``
(``build_tiny_grounder``, ``ensure_demo_grounder``).
"""

from .degradation import CaptionThresholds, DegradationEstimates, estimate_degradations
from .detector import DetectorSettings, GroundingDinoDetector
from .drm import RRDBNet, tiled_forward
from .grounder import GrounderConfig, SpaSemSRGrounder
from .masks import BoxMasker
from .tagger import ClipTagger, TaggerSettings, TagVocabulary

__all__ = [
    "BoxMasker",
    "CaptionThresholds",
    "ClipTagger",
    "DegradationEstimates",
    "DetectorSettings",
    "GrounderConfig",
    "GroundingDinoDetector",
    "RRDBNet",
    "SpaSemSRGrounder",
    "TagVocabulary",
    "TaggerSettings",
    "estimate_degradations",
    "tiled_forward",
]
