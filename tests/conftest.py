"""Shared fixtures: the tiny offline models, built once per test session."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"sd15", "sd15-inpaint", "sd3", "clip"} -> folder of a tiny random model."""
    return common.build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def repo_root():
    return ROOT
