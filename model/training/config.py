"""The hyper-parameters of a training run, apart from the training code: the ``spasemsr
train`` command builds its options from these fields (their help and bounds included) without
importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

MixedPrecision = Literal["no", "fp16", "bf16"]


def _option(default: Any, help: str, *, minimum: float | None = None,
            maximum: float | None = None, flag: str | None = None) -> Any:  # fmt: skip
    """A field with what its command-line option needs: ``help``, bounds, and a shorter
    ``flag`` where the field's name is long."""
    metadata = {"help": help, "min": minimum, "max": maximum, "flag": flag}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


@dataclass(kw_only=True)
class TrainingConfig:
    """Hyper-parameters of a training run; defaults from DESIGN 1.4 ([P] where the paper gives
    them, XPSR / SeeSR practice [I] otherwise)."""

    learning_rate: float = _option(5e-5, "AdamW learning rate.", minimum=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = _option(1e-8, "AdamW epsilon.", minimum=0.0)
    weight_decay: float = _option(1e-2, "AdamW weight decay.", minimum=0.0)
    warmup_steps: int = _option(500, "Linear warm-up steps, then a constant rate.", minimum=0)
    max_grad_norm: float = _option(1.0, "Gradient clipping norm.", minimum=0.0)
    null_prompt_ratio: float = _option(
        0.5, "Probability of the empty prompt for a sample (CFG).", minimum=0.0, maximum=1.0
    )
    lambda_semdeg: float = _option(
        0.05,
        "Eq. 12 lambda: weight of L_SemDeg, the sum of its four L1 terms (0: off).",
        minimum=0.0,
    )
    batch_size: int = _option(32, "Patches per device and accumulation step.", minimum=1)
    gradient_accumulation_steps: int = _option(
        1, "Gradient accumulation steps.", minimum=1, flag="--accumulation"
    )
    resolution: int = _option(512, "HR patch side in pixels.", minimum=8)
    scale: int = _option(
        4, "LR = HR / scale through the degradation (then bicubically back up).", minimum=1
    )
    horizontal_flip: bool = _option(True, "Random horizontal flips of the patches.")
    mixed_precision: MixedPrecision = _option("no", "Mixed precision.")  # noqa: RUF009 (a field)
    gradient_checkpointing: bool = _option(False, "Recompute activations to save memory.")
    checkpoint_every: int = _option(1000, "Steps between checkpoints.", minimum=1)
    checkpoints_total_limit: int | None = _option(
        3, "Checkpoints kept (oldest removed first).", minimum=1
    )
    max_steps: int = _option(200_000, "Optimiser steps (after accumulation).", minimum=1)
    log_every: int = _option(10, "Steps between loss log lines.", minimum=1)
    seed: int = _option(0, "Random seed.")
    num_workers: int = _option(0, "Data loader workers.", minimum=0)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.null_prompt_ratio <= 1.0:
            raise ValueError(f"null_prompt_ratio must be in [0, 1], got {self.null_prompt_ratio}")
        for name in ("lambda_semdeg", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.scale < 1 or self.resolution % self.scale:
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of the scale {self.scale}"
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(
                f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision}"
            )
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data
