"""Reading never writes: fill-mask, evaluate, score, convert_weights' source and --resume's
path resolution leave the checkpoints they read exactly as they were, byte for byte, name for
name, and work on read-only storage, even beside the leftovers of an interrupted swap.

Tests may run as root, where a read-only mode does not stop a write. So the store is made
read-only (which stops any write when not root) and, in every case, its tree is snapshotted
before and after: names, kinds, modes, sizes, mtimes and contents must all be unchanged."""

import hashlib
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, call_main
from convert_weights import convert, parse_args as convert_args
from minibert import evaluate, fill_mask, score, safe_write
from minibert.checkpoint import read_checkpoint, save_pretrained
from minibert.model import BertConfig, BertForMaskedLM
from minibert.train_config import TrainConfig
from minibert.train_state import DataPosition, load_training_state, save_training_state
from minibert.resume import starting_point

VOCAB_SOURCE = ASSETS / "tokenizer" / "bert-base-uncased"
CORPUS = ASSETS / "corpus" / "wikipedia-sample"


def tiny(seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))


def snapshot(root: Path) -> dict:
    """Everything a write could change under root, the root included."""
    tree = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        tree[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode),
                                             info.st_size, info.st_mtime_ns, content)
    return tree


def set_modes(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755 if writable else 0o555)
        else:
            path.chmod(0o644 if writable else 0o444)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A read-only folder holding: `final`, whose replacement was killed between the renames
    of a swap (final itself missing, its complete new side and its old side beside it), a
    temporary of a killed write, and a run's resume checkpoint step-2, interrupted the same
    way, beside a killed prune's leftover."""
    root, staging = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("staging")
    pid, host = os.getpid(), safe_write._host()
    other = "0" * 8 if safe_write._stamp(pid) != "0" * 8 else "1" * 8  # a gone writer's stamp
    for seed, piece in ((1, f".final.old-{pid}-{host}-{other}-111111"),
                        (2, f".final.new-{pid}-{host}-{other}-222222")):
        # Written elsewhere and moved in: a write beside the pieces would finish the swap.
        save_pretrained(tiny(seed), staging / "model", tokenizer_source=VOCAB_SOURCE)
        os.rename(staging / "model", root / piece)
    (root / f".final.tmp-{pid}-{host}-{other}-333333").mkdir()  # a killed write's temporary
    model = tiny(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_training_state(
        staging / "step-2", model=model, tokenizer_source=VOCAB_SOURCE, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False), rng_states=[],
        position=DataPosition(2, 0, 2, 4, 40), config={})
    # The run's step-2 was being replaced too: only its complete new side is there.
    checkpoints = root / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.rename(staging / "step-2", checkpoints / f".step-2.new-{pid}-{host}-{other}-555555")
    (checkpoints / f".step-1.del-{pid}-{host}-{other}-444444").mkdir()  # a killed prune
    set_modes(root, writable=False)
    yield root
    set_modes(root, writable=True)  # so that pytest can delete it


@pytest.fixture
def unchanged(store):
    """Fails the test if anything under the store changed."""
    before = snapshot(store)
    yield store
    assert snapshot(store) == before


def test_fill_mask_reads_the_complete_side_and_writes_nothing(unchanged, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["minibert-fill-mask", "--model", str(unchanged / "final"),
                                      "--json", "Paris is the [MASK] of France."])
    status, stdout, stderr = call_main(lambda argv: fill_mask.main(), monkeypatch, capsys)
    assert status == 0 and '"predictions"' in stdout
    assert ".final.new-" in stderr  # the note names the side it read


def test_score_writes_nothing(unchanged, monkeypatch, capsys):
    status, stdout, _ = call_main(score.main, monkeypatch, capsys, "--model",
                                  str(unchanged / "final"), "Go!")
    assert status == 0 and "Go!" in stdout


def test_evaluate_writes_nothing(unchanged, monkeypatch, capsys, tmp_path):
    status, stdout, _ = call_main(evaluate.main, monkeypatch, capsys, "--model",
                                  str(unchanged / "final"), "--data", str(CORPUS),
                                  "--max_seq_length", "32", "--max_blocks", "4",
                                  "--device", "cpu", "--precision", "fp32",
                                  "--cache_dir", str(tmp_path / "cache"), "--json")
    assert status == 0 and '"perplexity"' in stdout


def test_reading_a_model_and_converting_it_write_nothing_beside_it(unchanged, tmp_path):
    model, folder, notices = read_checkpoint(unchanged / "final")
    assert folder.name.startswith(".final.new-") and any(".final.new-" in n for n in notices)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 tiny(2).state_dict().values()))
    convert(convert_args([str(unchanged / "final"), str(tmp_path / "converted")]))
    assert read_checkpoint(tmp_path / "converted")[0].config == model.config


def test_resume_path_resolution_writes_nothing(unchanged, tmp_path):
    source = unchanged / "run" / "checkpoints" / "step-2"
    config = TrainConfig(model=str(unchanged / "final"), data=str(CORPUS), resume=str(source),
                         out_dir=str(tmp_path / "new-run"))
    resume_from = starting_point(config, Path(config.out_dir))
    assert resume_from.parent == source.parent and resume_from.name.startswith(".step-2.new-")
    read_checkpoint(resume_from / "model")
    assert load_training_state(resume_from)["position"].step == 2
