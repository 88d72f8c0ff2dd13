"""Shared fixtures: tiny random-weight checkpoints made with transformers, the reference."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
# A shell that starts the tests in the background (`pytest &` in a script) ignores SIGINT in
# them, and every process they start inherits that: the Ctrl-C tests would then test nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)

from checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory) -> Path:
    """Mistral config with a sliding window of 8, GQA 4:2, OpenHermes tokenizer files."""
    return make_checkpoint(tmp_path_factory.mktemp("mistral"), window=8)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama"), arch="llama", kv_heads=4)
