"""Shared test fixtures: where the offline assets are, and small helpers."""

from pathlib import Path
from typing import Callable

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


def call_main(main: Callable, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """A command's main(argv) in this process (no new interpreter per case): its exit
    status, stdout and stderr."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_status:
        main(list(args))
    stdout, stderr = capsys.readouterr()
    return exit_status.value.code, stdout, stderr
