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

**Shape buckets.** Static shapes compile (and capture a CUDA graph) once per input shape, and
Dynamo stops compiling a module after ``recompile_limit`` shapes, running every later shape
uncompiled for the worker's life. So a compiled worker serves a fixed set of shapes, all compiled
at warm-up: tile sides from ``tile_buckets`` (a request's ``tile_size`` maps onto them with
:func:`tile_bucket`; a tile smaller than its bucket -- an image smaller than a tile -- is
reflect-padded up to it and its prediction cropped back), and forward batches from
:attr:`PerformanceSettings.forward_batches` (a batch of tiles is split into the tile counts of
:attr:`PerformanceSettings.tile_counts`).

Per-image work (text encoding, visual guidance, tile conditioning) is computed once before the
denoising loop by the pipeline itself whatever the settings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from model.pipeline.diffusion import SpaSemSRPipeline

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

CUDA_TILE_BUCKETS = (256, 512)
"""Tile sides (output pixels) a compiled CUDA worker serves: 512, SD-2-base's training size and
the default, and 256, the out-of-memory retry's halved tiles and the bucket of small images.
Requests of 1024-px tiles run at 512: one more bucket would mean five more compilations of each
module at warm-up for a rarely chosen size."""

RECOMPILE_HEADROOM = 8
"""Shapes allowed beyond the served set before Dynamo gives up on a module (a second pipeline in
the same process, e.g. a benchmark, shares the modules' code objects and so their cache)."""


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
    shape per forward (at most); ``tile_buckets``: the tile sides in output pixels that the
    denoiser runs at (empty: each image's own tile shape, as eager runs need no buckets).
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
    tile_buckets: tuple[int, ...] = ()
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
        buckets = self.tile_buckets
        if any(side < 1 for side in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"tile_buckets must be increasing positive sides, got {buckets}")

    @property
    def tile_counts(self) -> tuple[int, ...]:
        """Tiles per forward: the powers of two up to ``tile_batch_size``, and that size. Any
        number of tiles splits into these (largest first), so no batch is padded with dummy tiles
        and the set of batch shapes stays small."""
        counts = {1 << bit for bit in range(self.tile_batch_size.bit_length())}
        return tuple(sorted(counts | {self.tile_batch_size}))

    @property
    def forward_batches(self) -> tuple[int, ...]:
        """Batch sizes of the denoiser's forwards: tile counts, and twice those when the two
        classifier-free-guidance halves run together (a request without guidance runs one)."""
        halves = (1, 2) if self.cfg_batched else (1,)
        return tuple(sorted({count * half for count in self.tile_counts for half in halves}))

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
                tile_buckets=CUDA_TILE_BUCKETS,
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
            "tile_buckets": list(self.tile_buckets) or "off",
        }


def tile_bucket(buckets: Sequence[int], tile_size: int) -> int:
    """The served tile side for a requested ``tile_size``: the largest bucket not above it, so a
    request never gets larger tiles (more memory) than it asked for, and the out-of-memory retry's
    halving still shrinks them; below every bucket, the smallest."""
    if not buckets:
        raise ValueError("no tile buckets to choose from")
    fitting = [side for side in buckets if side <= tile_size]
    return max(fitting) if fitting else min(buckets)


@dataclass(frozen=True)
class WarmUpReport:
    """What a worker's warm-up did: ``seconds`` in all, of which ``compile_seconds`` compiling and
    capturing the served ``shapes`` (``(batch, latent height, latent width)`` of the denoiser's
    forwards), and the number of ``graphs`` Dynamo compiled meanwhile."""

    seconds: float
    compile_seconds: float = 0.0
    shapes: tuple[tuple[int, int, int], ...] = ()
    graphs: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
            "shapes": [list(shape) for shape in self.shapes],
            "graphs": self.graphs,
        }


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
    if settings.tile_buckets:
        multiple = pipeline.pixel_multiple
        if any(side % multiple for side in settings.tile_buckets):
            raise ValueError(
                f"tile_buckets {settings.tile_buckets} must be multiples of {multiple} pixels"
            )
    if settings.compile:
        if settings.tile_buckets:
            # Every served shape must stay compiled: the per-code-object cache limit (8 by
            # default) is below the served set of the CUDA preset (2 sides x 5 batches).
            served = len(settings.tile_buckets) * len(settings.forward_batches)
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, served + RECOMPILE_HEADROOM)
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
