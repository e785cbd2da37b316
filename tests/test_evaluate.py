"""The evaluation command: the numbers of train.py's own evaluation, exact across processes,
plain and JSON output, one-line errors for bad input."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minibert.evaluate import EvaluateArgs, format_result, main
from minibert.train_config import TrainConfig
from minibert.trainer import train
# The tiny random BERT and tiny corpus of the training tests (pytest finds imported fixtures).
from test_train import SEQ, cache_dir, read_metrics, run_cli, tiny_corpus, tiny_model  # noqa: F401

from conftest import ASSETS, BERT_TINY, MINILM, call_main

WIKITEXT_2 = ASSETS / "corpus" / "wikitext-2-raw"  # the real WikiText-2 test split, nothing else

JSON_KEYS = ["loss", "perplexity", "accuracy", "blocks", "masked_tokens", "model", "data", "split",
             "masking"]


def evaluate_json(*args: str, processes: int = 1) -> dict:
    """Run the command (under torchrun when processes > 1) and return its one JSON object."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable])
    result = run_cli([*launcher, "-m", "minibert.evaluate", *args, "--json"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # rank 0 prints, the others do not
    return json.loads(lines[0])


@pytest.mark.parametrize("whole_word_mask", [False, True], ids=["token", "whole-word"])
def test_reproduces_the_final_evaluation_of_a_training_run(monkeypatch, capsys, tiny_model,
                                                           tiny_corpus, cache_dir, tmp_path,
                                                           whole_word_mask):
    # Settings away from every default, so that a setting the command ignores shows up.
    config = TrainConfig(model=str(tiny_model), data=str(tiny_corpus),
                         out_dir=str(tmp_path / "run"), cache_dir=str(cache_dir),
                         max_seq_length=SEQ, batch_size=2, max_steps=3, lr=1e-2, warmup_steps=1,
                         precision="fp32", device="cpu", dropout=0.0, log_every=1, eval_every=0,
                         save_every=0, eval_seed=5, mlm_probability=0.25, eval_max_blocks=5,
                         eval_batch_size=2, whole_word_mask=whole_word_mask)
    train(config, environ={})
    final = [r for r in read_metrics(config.out_dir) if r["step"] == 3 and "eval_loss" in r][0]

    capsys.readouterr()  # train.py's own output
    status, stdout, stderr = run_main(
        monkeypatch, capsys, "--model", str(Path(config.out_dir) / "final"), "--data",
        str(tiny_corpus), "--max_seq_length", str(SEQ), "--eval_seed", "5", "--mlm_probability",
        "0.25", "--max_blocks", "5", "--batch_size", "3", "--precision", "fp32", "--device",
        "cpu", "--cache_dir", str(cache_dir), "--json",
        *(["--whole_word_mask"] if whole_word_mask else []))
    assert status == 0, stderr
    result = json.loads(stdout)
    print(f"training run's final eval loss {final['eval_loss']!r}, command {result['loss']!r}: "
          f"difference {abs(result['loss'] - final['eval_loss']):.3g}")
    assert list(result) == JSON_KEYS
    assert result["loss"] == pytest.approx(final["eval_loss"], rel=1e-6, abs=0)
    assert result["perplexity"] == pytest.approx(final["eval_perplexity"], rel=1e-5)
    assert result["accuracy"] == final["eval_accuracy"]
    assert result["blocks"] == 5 and result["split"] == "validation"
    assert result["masking"] == final["eval_masking"]
    # The loss differs from the untrained model's: the command read the trained weights.
    untrained = read_metrics(config.out_dir)[0]
    assert untrained["step"] == 0 and untrained["eval_loss"] != pytest.approx(result["loss"])


def test_two_processes_give_the_numbers_of_one(tiny_model, tiny_corpus, cache_dir):
    # 7 validation blocks: the two ranks get 4 and 3.
    args = ("--model", str(tiny_model), "--data", str(tiny_corpus), "--max_seq_length", str(SEQ),
            "--batch_size", "2", "--precision", "fp32", "--device", "cpu",
            "--cache_dir", str(cache_dir))
    one, two = evaluate_json(*args), evaluate_json(*args, processes=2)
    assert one["blocks"] == two["blocks"] == 7
    print(f"1 vs 2 processes: loss {one['loss']!r} vs {two['loss']!r}, difference "
          f"{abs(one['loss'] - two['loss']):.3g}")
    assert one["masked_tokens"] == two["masked_tokens"] and one["accuracy"] == two["accuracy"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-9, abs=0)
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-8)


run_main = functools.partial(call_main, main)  # the command in this process


def test_plain_output_holds_the_json_numbers(monkeypatch, capsys, tiny_model, tiny_corpus,
                                             cache_dir):
    args = ("--model", str(tiny_model), "--data", str(tiny_corpus), "--split", "valid",
            "--max_seq_length", str(SEQ), "--precision", "fp32", "--device", "cpu",
            "--cache_dir", str(cache_dir))
    status, plain, _ = run_main(monkeypatch, capsys, *args)
    assert status == 0
    status, as_json, _ = run_main(monkeypatch, capsys, *args, "--json")
    assert status == 0
    result = json.loads(as_json)
    assert plain == format_result(result, SEQ) + "\n"
    lines = plain.splitlines()
    assert lines[0] == f"model          {tiny_model}"
    assert lines[1] == f"data           {tiny_corpus} (validation)"
    assert lines[2] == f"blocks         7 of {SEQ} tokens"
    assert lines[3] == f"masked tokens  {result['masked_tokens']} (token masking)"
    assert lines[4] == f"loss           {result['loss']:.4f}"
    assert lines[5] == f"perplexity     {result['perplexity']:.2f}"
    assert lines[6] == f"accuracy       {result['accuracy']:.4f}"


@pytest.fixture(scope="module")
def empty_corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("empty-corpus")
    (folder / "valid.txt").write_text("\n   \n\n", encoding="utf-8")
    return folder


BAD_INPUTS = {  # id: (extra arguments, message expected on stderr)
    "no such split": (["--split", "test"], "no test split"),
    "unknown split": (["--split", "dev"], "unknown split 'dev'"),
    "empty corpus": (["--data", "{empty}"], "the corpus is empty"),
    "too long": (["--max_seq_length", "65"],
                 "max_seq_length 65 exceeds the model's max_position_embeddings (64)"),
    "bad model path": (["--model", "/nonexistent/model"], "/nonexistent/model: no such folder"),
    "no masked-LM head": (["--model", str(MINILM), "--max_seq_length", "32"],
                          "has no masked-LM head"),
    "bad precision": (["--precision", "fp8"], "precision must be one of auto|fp32|fp16|bf16"),
    "bad max_blocks": (["--max_blocks", "0"], "max_blocks must be >= 1"),
    "split not there": (["--data", str(WIKITEXT_2)],
                        f"{WIKITEXT_2}: no validation split (looked for wiki.valid.raw, "
                        f"valid.txt, valid/, validation/); the splits there: test; pass --split "
                        f"test"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_one_line_error(monkeypatch, capsys, tiny_model, tiny_corpus, cache_dir,
                                       empty_corpus, case):
    extra, message = BAD_INPUTS[case]
    args = ["--model", str(tiny_model), "--data", str(tiny_corpus), "--max_seq_length", str(SEQ),
            "--device", "cpu", "--cache_dir", str(cache_dir)]
    args += [a.format(empty=empty_corpus) for a in extra]  # later flags win
    status, stdout, stderr = run_main(monkeypatch, capsys, *args)
    assert status == 1 and stdout == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr


def test_shared_checkpoint_offline(monkeypatch, capsys):
    """The real bert-tiny on the real corpus."""
    status, stdout, stderr = run_main(
        monkeypatch, capsys, "--model", str(BERT_TINY), "--data",
        str(BERT_TINY.parents[1] / "corpus" / "wikipedia-sample"), "--max_seq_length", "128",
        "--max_blocks", "8", "--precision", "fp32", "--json")
    assert status == 0, stderr
    result = json.loads(stdout)
    assert result["blocks"] == 8 and result["masked_tokens"] == 8 * 19  # round(0.15 * 126)
    assert 4 < result["loss"] < 12  # a real model: far from uniform (10.33) in either direction


def test_the_shipped_wikitext_2_test_split(monkeypatch, capsys, cache_dir):
    """The README's command for WikiText-2's test split, on its first blocks."""
    status, stdout, stderr = run_main(
        monkeypatch, capsys, "--model", str(BERT_TINY), "--data", str(WIKITEXT_2), "--split",
        "test", "--max_seq_length", "128", "--max_blocks", "4", "--precision", "fp32",
        "--cache_dir", str(cache_dir), "--json")
    assert status == 0, stderr
    result = json.loads(stdout)
    assert result["split"] == "test" and result["blocks"] == 4
    assert 4 < result["loss"] < 12


@pytest.fixture(scope="module")
def long_block_corpus(tmp_path_factory) -> Path:
    """About 2 training and 5 validation blocks of 512 tokens (train.py's default length)."""
    folder = tmp_path_factory.mktemp("long-block-corpus")
    for split, size in (("train", 6_000), ("valid", 12_000)):
        text = (BERT_TINY.parents[1] / "corpus" / "wikipedia-sample" / f"{split}.txt").read_text(
            encoding="utf-8")[:size]
        (folder / f"{split}.txt").write_text(text.rsplit("\n", 1)[0] + "\n", encoding="utf-8")
    return folder


def test_defaults_give_the_numbers_of_train_py_defaults(monkeypatch, capsys, long_block_corpus,
                                                        tmp_path):
    """The claim behind EvaluateArgs' defaults: a run that leaves every evaluation setting at
    train.py's default and the command left at its own defaults measure the same thing. Only
    what is not an evaluation setting is set: where to read and write, a short run, and the
    evaluation batch (the command's 32, so that both sum the same batches: batch size changes
    only rounding). A default of either side that moved away from the other (max_seq_length,
    eval_seed, mlm_probability, whole_word_mask, precision, device, max_blocks) changes the
    blocks, the masks or the numerics, and the numbers with them."""
    config = TrainConfig(model=str(BERT_TINY), data=str(long_block_corpus),
                         out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                         batch_size=2, max_steps=1, log_every=1, save_every=0,
                         eval_batch_size=EvaluateArgs(model="m", data="d").batch_size)
    train(config, environ={})
    final = [r for r in read_metrics(config.out_dir) if r["step"] == 1 and "eval_loss" in r][0]

    capsys.readouterr()  # train.py's own output
    status, stdout, stderr = run_main(monkeypatch, capsys, "--model",
                                      str(Path(config.out_dir) / "final"), "--data",
                                      str(long_block_corpus), "--cache_dir", config.cache_dir,
                                      "--json")
    assert status == 0, stderr
    result = json.loads(stdout)
    assert result["blocks"] > 1 and result["masking"] == final["eval_masking"]
    # The same model, blocks, masks, batches and precision in one process: the same sums.
    assert result["accuracy"] == final["eval_accuracy"]
    assert result["loss"] == pytest.approx(final["eval_loss"], rel=1e-6, abs=0)


def test_help():
    result = subprocess.run([sys.executable, "-m", "minibert.evaluate", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for flag in ("--model", "--data", "--split", "--max_seq_length", "--batch_size",
                 "--eval_seed", "--max_blocks", "--precision", "--device", "--json"):
        assert flag in result.stdout
    assert "torchrun" in result.stdout
    # The example for a test split is one that runs offline: the shipped WikiText-2 folder.
    assert "--data ../shared/assets/corpus/wikitext-2-raw --split test" in result.stdout


def test_console_script():
    script = Path(sys.executable).parent / "minibert-evaluate"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . creates it)")
    result = subprocess.run([str(script), "--model", "/nonexistent/model", "--data", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == "error: /nonexistent/model: no such folder\n"
