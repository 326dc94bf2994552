"""Fixtures for the SpaSemSR model tests: the tiny pipeline with seeded weights, built once per
session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.configs.spasemsr import build_tiny_pipeline, ensure_demo_pipeline
from model.pipeline.diffusion import SpaSemSRPipeline


@pytest.fixture(scope="session")
def tiny_pipeline() -> SpaSemSRPipeline:
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_pipeline(tmp_path_factory.mktemp("spasemsr") / "spasemsr-tiny", seed=0)


@pytest.fixture(autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy CPU spinning threads slow them
    down many times over; run each model test on one thread and restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
