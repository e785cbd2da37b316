"""Shared test fixtures: where the offline assets are, and small helpers."""

import os
from pathlib import Path
from typing import Callable

import pytest

# One torch thread per process, here and in every process a test starts (they inherit it),
# unless OMP_NUM_THREADS is set already. The tests' models are tiny: a second thread gains
# little on them, and on a busy machine each op waits for both threads to get a core (the
# training tests took 2.3x as long with 2 threads as with 1 at a load average of 15). Set
# before torch is imported, so that torch reads it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
