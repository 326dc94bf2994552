# mypy: disallow-untyped-calls=False, disallow-untyped-decorators=False
"""Speed settings of the SpaSemSR pipeline (DESIGN 1.2 steps 5-7; arXiv 2603.14112, Fig. 2).

Speed does not change what the pipeline computes, only how: precision of the weights, which
attention kernels run, memory layout, compilation, CUDA graphs, and how the denoising loop
batches its work (the two classifier-free-guidance halves, several tiles). Everything lives in one
frozen :class:`PerformanceSettings`; :func:`apply_performance` converts and compiles a pipeline's
modules and hands the loop settings to the pipeline. Two presets:

* :meth:`PerformanceSettings.straightforward`: fp32, eager, the reference attention (the full
  attention matrix, ``SDPBackend.MATH``), each CFG half a forward of its own, one tile at a time:
  what a plain implementation does, the baseline the optimised figures are compared with;
* :meth:`PerformanceSettings.optimised`: on CUDA bf16 (VAE included: bf16 has fp32's exponent
  range, so the decoder cannot overflow as it can in fp16), PyTorch's fused attention kernels,
  channels-last, ``torch.compile`` of UNet and ControlNet with static shapes and CUDA graphs, CFG
  in one batch, tiles in batches; on CPU the subset that helps there.

Per-image work (text encoding, visual guidance, tile conditioning) is computed once before the
denoising loop by the pipeline itself whatever the settings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from model.pipeline import SpaSemSRPipeline

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "math")
"""``sdpa``: PyTorch picks its fused kernel (flash, memory-efficient, cuDNN); ``math``: the
reference implementation that materialises the attention matrix."""

COMPILED_MODULES = ("unet", "controlnet")
"""The modules run at every denoising step, the only ones worth a compilation."""

CONVERTED_MODULES = (
    "unet",
    "controlnet",
    "unet_attention",
    "image_encoder",
    "semantic_encoder",
    "text_encoder",
)
"""The modules in ``PerformanceSettings.dtype`` (the VAE has its own ``vae_dtype``)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PerformanceSettings:
    """How the pipeline runs (not what it computes). Build one with a preset and
    ``dataclasses.replace`` to vary a field.

    ``dtype``: UNet, ControlNet, UNet additions, text, image and semantic encoders;
    ``vae_dtype``: the VAE; ``attention``: one of :data:`ATTENTION_BACKENDS`;
    ``channels_last``: convolutional modules in NHWC layout; ``compile``: ``torch.compile`` of
    :data:`COMPILED_MODULES` (static shapes: a new tile shape compiles once more);
    ``cuda_graphs``: compiled modules replayed as CUDA graphs (``reduce-overhead``; requires
    ``compile``); ``autotune``: Inductor's kernel autotuning (longer warm-up);
    ``compile_backend``: Dynamo backend (``inductor``; tests use ``aot_eager``);
    ``fullgraph``: fail on a graph break instead of splitting the graph; ``cfg_batched``:
    unconditional and conditional halves in one forward; ``tile_batch_size``: tiles of one
    shape per forward.
    """

    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    autotune: bool = False
    compile_backend: str = "inductor"
    fullgraph: bool = False
    cfg_batched: bool = True
    tile_batch_size: int = 1
    name: str = field(default="default", compare=False)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {self.attention!r}; expected one of "
                f"{ATTENTION_BACKENDS}"
            )
        for label, value in (("dtype", self.dtype), ("vae_dtype", self.vae_dtype)):
            if value not in DTYPES.values():
                raise ValueError(f"{label} must be one of {tuple(DTYPES)}, got {value}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile=True (graphs are captured by Inductor)")
        if self.tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1, got {self.tile_batch_size}")

    @property
    def compile_mode(self) -> str:
        """The ``torch.compile`` mode these flags stand for."""
        if self.cuda_graphs:
            return "max-autotune" if self.autotune else "reduce-overhead"
        return "max-autotune-no-cudagraphs" if self.autotune else "default"

    @classmethod
    def straightforward(cls) -> PerformanceSettings:
        """fp32, eager, reference attention, CFG halves apart, one tile at a time."""
        return cls(attention="math", cfg_batched=False, tile_batch_size=1, name="straightforward")

    @classmethod
    def optimised(cls, device: str | torch.device) -> PerformanceSettings:
        """The fastest settings that keep results close to fp32 on ``device``."""
        if torch.device(device).type == "cuda":
            return cls(
                dtype=torch.bfloat16,
                vae_dtype=torch.bfloat16,
                attention="sdpa",
                channels_last=True,
                compile=True,
                cuda_graphs=True,
                cfg_batched=True,
                tile_batch_size=8,
                name="optimised",
            )
        # CPU: bf16 is slower than fp32 without matrix extensions and Inductor's C++ build costs
        # minutes, so only the batching and the fused attention.
        return cls(attention="sdpa", cfg_batched=True, tile_batch_size=4, name="optimised")

    def describe(self) -> dict[str, Any]:
        """The settings as plain values (logs, benchmark tables)."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_dtype": str(self.vae_dtype).removeprefix("torch."),
            "attention": self.attention,
            "channels_last": self.channels_last,
            "compile": self.compile_mode if self.compile else "off",
            "cuda_graphs": self.cuda_graphs,
            "cfg_batched": self.cfg_batched,
            "tile_batch_size": self.tile_batch_size,
        }


def attention_context(backend: str) -> contextlib.AbstractContextManager[None]:
    """The SDPA kernels allowed inside the denoising forwards for ``backend``."""
    if backend == "math":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def apply_performance(pipeline: SpaSemSRPipeline, settings: PerformanceSettings) -> None:
    """Convert ``pipeline``'s modules in place (dtypes, layout, compilation) and hand it the loop
    settings.

    Apply once, to a freshly loaded pipeline: compilation wraps the modules' forwards and is not
    undone by applying other settings later.
    """
    dtypes = {name: settings.dtype for name in CONVERTED_MODULES} | {"vae": settings.vae_dtype}
    for name, dtype in dtypes.items():
        # nn.Module.to, not diffusers' override: the latter warns on every dtype cast of a model
        # that has no fp32-only modules, which none of ours has.
        torch.nn.Module.to(getattr(pipeline, name), dtype=dtype)
    if settings.channels_last:
        for name in ("unet", "controlnet", "vae", "image_encoder"):
            module: torch.nn.Module = getattr(pipeline, name)
            # memory_format is a documented keyword of Module.to that the stubs do not list.
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if settings.compile:
        options: dict[str, Any] = {
            "fullgraph": settings.fullgraph,
            "dynamic": False,
            "backend": settings.compile_backend,
        }
        if settings.compile_backend == "inductor":
            options["mode"] = settings.compile_mode
        for name in COMPILED_MODULES:
            getattr(pipeline, name).compile(**options)
    pipeline.performance = settings
    logger.info("SpaSemSR performance settings %s: %s", settings.name, settings.describe())


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference|| / ||reference||`` in float64."""
    difference = output.double() - reference.double()
    return float(difference.norm() / reference.double().norm().clamp_min(1e-12))


@contextlib.contextmanager
def count_flops() -> Iterator[Callable[[], int]]:
    """Count the FLOPs of the matrix products and convolutions run inside the block (PyTorch's
    ``FlopCounterMode``); yields a function that returns the running total."""
    counter = FlopCounterMode(display=False)
    with counter:
        yield counter.get_total_flops
