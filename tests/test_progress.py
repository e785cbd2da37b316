"""What a training run prints as it goes (minibert/progress.py): on a terminal the progress bar;
in a log file or a pipe whole lines, one per log step, with every evaluation line a line of its
own. A tiny random BERT on a tiny corpus, trained in this process with sys.stdout and sys.stderr
pointed at a file or at a pseudo-terminal."""

import fcntl
import json
import os
import pty
import re
import struct
import sys
import termios
import threading
from pathlib import Path

import pytest
import torch

from minibert import BertConfig, BertForMaskedLM
from minibert.checkpoint import save_pretrained
from minibert.train_config import TrainConfig
from minibert.trainer import train

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
CORPUS = ASSETS / "corpus" / "wikipedia-sample"


@pytest.fixture(scope="module")
def make_config(tmp_path_factory):
    """A 4-step run of a random 2-layer, hidden-32 BERT with the real bert-base-uncased
    vocabulary, on about 40 training and 7 validation blocks of 32 tokens."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("progress")
    save_pretrained(BertForMaskedLM(config), root / "tiny-bert",
                    tokenizer_source=ASSETS / "checkpoints" / "bert-tiny-splade-mlm")
    (root / "corpus").mkdir()
    for split, size in (("train", 6000), ("valid", 1200)):
        text = (CORPUS / f"{split}.txt").read_text(encoding="utf-8")[:size]
        (root / "corpus" / f"{split}.txt").write_text(text.rsplit(" ", 1)[0] + "\n",
                                                      encoding="utf-8")

    def make(name: str, **overrides) -> TrainConfig:
        base = dict(model=str(root / "tiny-bert"), data=str(root / "corpus"),
                    out_dir=str(root / name), cache_dir=str(root / "cache"), max_seq_length=32,
                    batch_size=2, max_steps=4, lr=1e-3, warmup_steps=1, precision="fp32",
                    device="cpu", log_every=1, eval_every=2, save_every=0, seed=3)
        return TrainConfig(**{**base, **overrides})
    return make


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


EVAL_LINE = re.compile(r"step (\d+): eval loss [\d.]+, perplexity [\d.]+, accuracy [\d.]+")
TRAIN_LINE = re.compile(r"step (\d+)/(\d+): train loss ([\d.]+), lr [\d.]+e[-+]\d+, "
                        r"[\d,]+ tokens/s")


def train_writing_to(config: TrainConfig, stdout, stderr, monkeypatch) -> None:
    """train() in this process, with sys.stdout and sys.stderr replaced for the run."""
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", stdout)
        patch.setattr(sys, "stderr", stderr)
        train(config, environ={})
    stdout.flush()
    stderr.flush()


def test_a_log_file_gets_whole_lines_without_a_bar(make_config, tmp_path, monkeypatch):
    """`train.py > log 2>&1`: no \\r redraws, every evaluation line a line of its own (grep
    finds it), one plain line per log step, in order; the data build says when it starts and
    ends. (A fresh cache, so that the build happens in this run.)"""
    config = make_config("log", max_steps=4, log_every=1, eval_every=2,
                         cache_dir=str(tmp_path / "fresh-cache"))
    log = tmp_path / "train.log"
    # As the shell does it: two streams, one file; stdout block-buffered, stderr line-buffered.
    with open(log, "wb") as file:
        stdout = open(os.dup(file.fileno()), "w", encoding="utf-8")
        stderr = open(os.dup(file.fileno()), "w", encoding="utf-8", buffering=1)
        with stdout, stderr:
            train_writing_to(config, stdout, stderr, monkeypatch)
    text = log.read_bytes().decode("utf-8")  # as written: read_text() would turn \r into \n
    assert "\r" not in text
    lines = text.split("\n")
    assert all(EVAL_LINE.fullmatch(line) for line in lines if "eval loss" in line), lines
    steps = [(int(m[1]), "eval") if (m := EVAL_LINE.fullmatch(line)) else
             (int(m[1]), "train") if (m := TRAIN_LINE.fullmatch(line)) else None
             for line in lines]
    assert [s for s in steps if s] == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"),
                                       (3, "train"), (4, "train"), (4, "eval")], lines
    losses = [float(m[3]) for line in lines if (m := TRAIN_LINE.fullmatch(line))]
    assert losses == [round(r["train_loss"], 4) for r in read_metrics(config.out_dir)
                      if "train_loss" in r]
    assert all(m[2] == "4" for line in lines if (m := TRAIN_LINE.fullmatch(line)))
    built = [line for line in lines if line.startswith("tokenizing ")]
    assert [line.split(":")[0] for line in built] == ["tokenizing train"] * 2 + [
        "tokenizing validation"] * 2, built
    assert re.search(r" blocks of 32 tokens in [\d.]+ s$", built[1]), built
    assert lines.index(built[-1]) < steps.index((0, "eval"))  # flushed in the order written


def test_a_terminal_keeps_the_progress_bar(make_config, monkeypatch):
    """stdout and stderr on a pseudo-terminal, as in an interactive shell: the bar is drawn
    (redrawn with \\r) and no plain training lines are printed; evaluation lines still are."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    received = []

    def read_all():  # until the terminal's other end is closed (EIO)
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            received.append(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        with open(slave, "w", encoding="utf-8", buffering=1) as terminal:
            train_writing_to(make_config("terminal", max_steps=2, log_every=1, eval_every=0),
                             terminal, terminal, monkeypatch)
    finally:
        reader.join(timeout=60)
        os.close(master)
    screen = b"".join(received).decode("utf-8", "replace").replace("\r\n", "\n")
    assert re.search(r"\rtraining: +\d+%\|", screen), screen
    assert re.search(r"training: 100%\|.*2/2 ", screen), screen
    assert "train loss" not in screen, screen
    assert len(re.findall(r"step \d+: eval loss", screen)) == 2, screen  # steps 0 and 2
