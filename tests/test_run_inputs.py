"""What a run checks before any work: every split present before tokenizing, a warning for
fp16 on a CPU, --resume naming a folder that is not there, a device that exists."""

from pathlib import Path

import pytest
import torch

import minibert.data
from conftest import ASSETS, BERT_TINY
from minibert.data import check_splits
from minibert.errors import MinibertError
from minibert.precision import precision_warning, resolve_device
from minibert.train_config import TrainConfig
from minibert.train_state import resolve_resume
from minibert.trainer import train


@pytest.fixture
def train_only(tmp_path) -> Path:
    folder = tmp_path / "train-only"
    folder.mkdir()
    text = (ASSETS / "corpus" / "wikipedia-sample" / "train.txt").read_text(encoding="utf-8")
    (folder / "train.txt").write_text(text[:3000], encoding="utf-8")
    return folder


def config(tmp_path, data, **overrides) -> TrainConfig:
    base = dict(model=str(BERT_TINY), data=str(data), out_dir=str(tmp_path / "run"),
                cache_dir=str(tmp_path / "cache"), max_seq_length=32, max_steps=1, device="cpu",
                precision="bf16")
    return TrainConfig(**{**base, **overrides})


def test_missing_validation_split_is_reported_before_tokenizing(tmp_path, train_only,
                                                                monkeypatch):
    def tokenize_lines(*args, **kwargs):
        raise AssertionError("tokenized before checking that every split exists")

    monkeypatch.setattr(minibert.data, "tokenize_lines", tokenize_lines)
    with pytest.raises(MinibertError, match=r"train-only: no validation split \(looked for "
                                            r"wiki.valid.raw, valid.txt, valid/, validation/\); "
                                            r"the splits there: train"):
        train(config(tmp_path, train_only), environ={})
    assert not (tmp_path / "cache").exists()


def test_check_splits(tmp_path, train_only):
    check_splits(train_only, ["train"])
    check_splits({"train": train_only / "train.txt", "valid": train_only / "train.txt"},
                 ("train", "validation"))
    with pytest.raises(MinibertError, match="no validation split among the files given"):
        check_splits({"train": train_only / "train.txt"}, ("train", "validation"))
    with pytest.raises(MinibertError, match="missing.txt: no such file"):
        check_splits({"train": train_only / "train.txt", "validation": tmp_path / "missing.txt"},
                     ("train", "validation"))
    check_splits("wikitext-2-raw-v1", ("train", "validation"))  # the hub has every split


def test_fp16_on_a_cpu_warns_and_names_auto(tmp_path, train_only, capsys):
    # (Whether bf16 warns depends on the CPU: tests/test_precision.py covers it.)
    cpu = torch.device("cpu")
    assert "--precision auto" in precision_warning("fp16", cpu)
    assert precision_warning("fp32", cpu) is None
    for precision, warned in (("fp16", True), ("fp32", False)):
        with pytest.raises(MinibertError, match="no validation split"):  # stops after the warning
            train(config(tmp_path, train_only, precision=precision), environ={})
        lines = capsys.readouterr().out.splitlines()
        assert (precision_warning("fp16", cpu) in lines) == warned


def test_resume_from_a_folder_that_does_not_exist(tmp_path):
    missing = tmp_path / "runs" / "x" / "checkpoints" / "step-5"
    with pytest.raises(MinibertError, match=f"--resume {missing}: no such folder"):
        resolve_resume(str(missing), tmp_path / "runs" / "x")
    missing.mkdir(parents=True)
    with pytest.raises(MinibertError, match="not a resume checkpoint"):
        resolve_resume(str(missing), tmp_path / "runs" / "x")


def test_device_choice_follows_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == "cpu"
    with pytest.raises(MinibertError, match="device cuda: no CUDA device is visible"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda"
    assert resolve_device("cpu") == "cpu"
