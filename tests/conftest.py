"""Shared test fixtures: where the offline assets are, and small helpers."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
BERT_TINY = ASSETS / "checkpoints" / "bert-tiny-splade-mlm"
MINILM = ASSETS / "checkpoints" / "minilm-l6-h384-uncased"


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.fail(f"shared assets not found at {ASSETS}: ../shared must sit beside the repo")
    return ASSETS
