"""Pretraining from scratch (init = "random", [model_config]), heads initialised from the
run's seed, fill-mask's refusal of a checkpoint without a head, and whole-word masking through
the whole training loop (1 vs 2 processes, resume)."""

import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from minibert import BertConfig, MinibertError, load_tokenizer
from minibert.batches import step_batch
from minibert.checkpoint import init_model, random_init, read_checkpoint
from minibert.masking import IGNORE_INDEX, word_starts
from minibert.train_config import parse_config
from minibert.trainer import setup, train
from test_train import (ASSETS, by_step, cache_dir, config_flags, fit_with,  # noqa: F401
                        make_config, max_difference, sigterm_at, read_metrics, run_cli, tiny_corpus, tiny_model)

MINILM = ASSETS / "checkpoints" / "minilm-l6-h384-uncased"  # a BertModel: no masked-LM head
VOCAB_ONLY = ASSETS / "tokenizer" / "bert-base-uncased"  # vocab.txt alone
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)


@pytest.fixture
def config_folder(tiny_model, tmp_path) -> Path:
    """A folder with config.json and vocab.txt and no weights: enough for init = "random"."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in ("config.json", "vocab.txt"):
        shutil.copyfile(tiny_model / name, folder / name)
    return folder


def mlm_head(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("mlm_head.")}


# ---------------------------------------------------------------------------------------------
# BERT's initialisation from a seed


def test_init_model_is_berts_initialisation_from_the_seed_alone():
    config = BertConfig(**SMALL)
    before = torch.get_rng_state()
    first = init_model(config, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
    torch.manual_seed(123)
    torch.rand(10)  # whatever ran before does not matter
    second = init_model(config, seed=3)
    other = init_model(config, seed=4)
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(),
                               other.state_dict().values()):
        assert torch.equal(a, b), name
        if name.endswith("weight") and a.ndim == 2:
            assert not torch.equal(a, c), name

    state = first.state_dict()
    embeddings = state["bert.embeddings.word_embeddings.weight"]  # (30522, 32)
    assert (embeddings[config.pad_token_id] == 0).all()  # [PAD] row zero
    assert abs(embeddings[1:].std().item() - 0.02) < 0.0005  # N(0, 0.02)
    assert (state["bert.layers.0.attention.qkv.bias"] == 0).all()
    assert (state["bert.layers.0.output_norm.weight"] == 1).all()
    assert (state["mlm_head.bias"] == 0).all()


def test_random_init_reads_config_and_vocab_only(config_folder):
    assert not any(config_folder.glob("*.safetensors"))
    model, folder, notices = random_init(config_folder, seed=0)
    assert folder == config_folder and notices == []
    assert model.config == BertConfig(**SMALL)
    model, _, _ = random_init(config_folder, seed=0, overrides={"num_hidden_layers": 3,
                                                                 "hidden_dropout_prob": 0.0})
    assert len(model.bert.layers) == 3 and model.config.hidden_dropout_prob == 0.0
    with pytest.raises(MinibertError, match="no weights"):  # the folder really has none
        read_checkpoint(config_folder)

    # vocab.txt alone: bert-base's shape (BertConfig's defaults), said in a notice.
    model, _, notices = random_init(VOCAB_ONLY, seed=0, overrides={"num_hidden_layers": 1})
    assert model.config == BertConfig(num_hidden_layers=1) and "no config.json" in notices[0]

    with pytest.raises(MinibertError, match=r"vocab_size 1000 does not match .*30522 tokens"):
        random_init(config_folder, seed=0, overrides={"vocab_size": 1000})
    with pytest.raises(MinibertError, match=r"model_config: hidden_size \(32\) is not divisible"):
        random_init(config_folder, seed=0, overrides={"num_attention_heads": 5})


def test_pad_token_id_must_be_the_vocabularys_pad(config_folder, tiny_model, tmp_path):
    # [PAD] is 0 in the real vocabulary. pad_token_id 7 would leave [PAD]'s embedding row
    # training and freeze token 7's at zero: refused in one line, for a new model (init random)
    # as for a checkpoint whose config.json says so.
    with pytest.raises(MinibertError, match=r"^pad_token_id 7 does not match .*vocab.txt, "
                                            r"where \[PAD\] is 0"):
        random_init(config_folder, seed=0, overrides={"pad_token_id": 7})
    wrong = tmp_path / "wrong-pad"
    shutil.copytree(tiny_model, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "pad_token_id": 7}))
    with pytest.raises(MinibertError, match=r"^pad_token_id 7 does not match .*\[PAD\] is 0"):
        read_checkpoint(wrong)
    with pytest.raises(MinibertError, match=r"^vocab_size 1000 does not match .*30522 tokens"):
        random_init(config_folder, seed=0, overrides={"vocab_size": 1000, "pad_token_id": 7})

# ---------------------------------------------------------------------------------------------
# [model_config] in TOML files and on the command line


def test_model_config_table_and_inline_table(tmp_path):
    file = tmp_path / "scratch.toml"
    file.write_text('init = "random"\nlr = 1e-3\n\n[model_config]\nnum_hidden_layers = 4\n'
                    'hidden_size = 256\nlayer_norm_eps = 1\n')
    config = parse_config(["--config", str(file)])
    assert config.init == "random" and config.lr == 1e-3
    assert config.model_config == {"num_hidden_layers": 4, "hidden_size": 256,
                                   "layer_norm_eps": 1}
    config = parse_config(["--config", str(file), "--model_config", "{num_hidden_layers = 2}"])
    assert config.model_config == {"num_hidden_layers": 2}  # the flag replaces the table


@pytest.mark.parametrize("text, message", [
    ('init = "random"\n[model_config]\nnum_layers = 4\n',
     "model_config: unknown BertConfig field num_layers (did you mean num_hidden_layers?)"),
    ('init = "random"\n[model_config]\nhidden_size = "big"\n',
     "model_config: hidden_size must be int, got 'big'"),
    ('init = "random"\n[model_config]\nnum_hidden_layers = 2\nlr = 1e-3\n',
     "unknown BertConfig field lr (lr is a training setting: put it above the [model_config]"),
    ('[model_config]\nnum_hidden_layers = 2\n', 'model_config reshapes the model, so it needs '
     'init = "random"'),
    ('init = "scratch"\n', "init must be one of pretrained|random"),
])
def test_bad_model_config_is_a_one_line_error(tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(MinibertError) as error:
        parse_config(["--config", str(file)])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_inline_model_config_from_the_script():
    result = run_cli([sys.executable, "train.py", "--init", "random", "--model_config", "4"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "model_config must be a TOML inline table" in lines[0]


# ---------------------------------------------------------------------------------------------
# pretraining from scratch


def test_pretraining_from_scratch_starts_at_ln_vocab_and_learns(make_config, config_folder,
                                                                 capsys):
    shape = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2,
             "intermediate_size": 128}
    config = make_config("scratch", model=str(config_folder), init="random", model_config=shape,
                         max_steps=8, eval_every=4, lr=1e-2)
    train(config, environ={})
    evals = by_step(read_metrics(config.out_dir), "eval_loss")
    ln_vocab = math.log(30522)
    assert f"ln(vocab size 30522) = {ln_vocab:.4f}" in capsys.readouterr().out
    print(f"eval loss at steps 0, 4, 8: {evals[0]:.4f} {evals[4]:.4f} {evals[8]:.4f}; "
          f"ln(V) {ln_vocab:.4f}")
    assert abs(evals[0] - ln_vocab) < 0.3  # a fresh model guesses uniformly
    assert evals[8] < evals[4] < evals[0]  # and it learns

    # final/config.json records the shape that was trained.
    saved = json.loads((Path(config.out_dir) / "final" / "config.json").read_text())
    assert {k: saved[k] for k in shape} == shape
    model, _, _ = read_checkpoint(Path(config.out_dir) / "final")
    assert len(model.bert.layers) == 1 and model.config.hidden_size == 64

    # The same seed draws the same weights: the step-0 evaluation is reproduced exactly.
    again = replace(config, out_dir=str(Path(config.out_dir).parent / "again"), max_steps=1)
    train(again, environ={})
    assert by_step(read_metrics(again.out_dir), "eval_loss")[0] == evals[0]


# ---------------------------------------------------------------------------------------------
# checkpoints without a masked-LM head


def test_a_checkpoint_without_head_gets_a_head_from_the_seed(make_config):
    torch.manual_seed(1)
    first, _, notices = read_checkpoint(MINILM, seed=5)
    torch.manual_seed(2)  # the global generator's history does not matter
    second, _, _ = read_checkpoint(MINILM, seed=5)
    other, _, _ = read_checkpoint(MINILM, seed=6)
    assert any("no masked-LM head" in notice for notice in notices)
    assert all(torch.equal(a, b) for a, b in zip(mlm_head(first).values(),
                                                 mlm_head(second).values()))
    assert not torch.equal(mlm_head(first)["mlm_head.dense.weight"],
                           mlm_head(other)["mlm_head.dense.weight"])
    # Training draws the head from the run's seed.
    run = setup(make_config("minilm", model=str(MINILM), seed=5), environ={})
    assert all(torch.equal(a, b) for a, b in zip(mlm_head(run.model).values(),
                                                 mlm_head(first).values()))


def test_fill_mask_refuses_a_checkpoint_without_head():
    with pytest.raises(MinibertError, match="fine-tune it first"):
        read_checkpoint(MINILM, require_head=True)
    result = run_cli([sys.executable, "-m", "minibert.fill_mask", "--model", str(MINILM),
                      "Paris is the [MASK] of France."])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "fine-tune it first" in lines[0]


# ---------------------------------------------------------------------------------------------
# whole-word masking in the training loop


def assert_whole_words(input_ids: torch.Tensor, labels: torch.Tensor, tokenizer) -> None:
    """No word of any row is partly a target."""
    starts = word_starts(tokenizer, input_ids)
    words = starts.long().cumsum(dim=-1) - 1
    chosen = labels != IGNORE_INDEX
    assert chosen.any(dim=-1).all()
    for row in range(len(input_ids)):
        pieces = torch.bincount(words[row])
        chosen_pieces = torch.bincount(words[row], weights=chosen[row].double()).long()
        assert ((chosen_pieces == 0) | (chosen_pieces == pieces)).all()


def test_whole_word_runs_are_equal_on_one_and_two_processes(make_config):
    two = make_config("wwm-two-processes", batch_size=2, eval_every=4, whole_word_mask=True)
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2", "train.py", *config_flags(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    one = make_config("wwm-one-process", batch_size=4, eval_every=4, whole_word_mask=True)
    train(one, environ={})
    runs = [read_metrics(config.out_dir) for config in (two, one)]
    difference = max_difference(*(by_step(records, "train_loss") for records in runs))
    print(f"max train-loss difference, whole-word, 2 processes vs 1: {difference:.3g}")
    assert difference < 1e-5
    assert max_difference(*(by_step(records, "eval_loss") for records in runs)) < 1e-5
    assert all(r["eval_masking"] == "whole-word" for r in runs[1] if "eval_loss" in r)

    # The masks the trainer makes are whole-word masks, in training and in evaluation.
    run = setup(replace(one, overwrite=True), environ={})
    tokenizer = load_tokenizer(run.model_folder)
    inputs, labels = step_batch(run.train_blocks, run.layout, run.mask, 0, torch.device("cpu"))
    blocks = torch.from_numpy(run.train_blocks[run.layout.rows(0, 0).reshape(-1)]).long()
    assert_whole_words(blocks, labels.view(len(blocks), -1), tokenizer)
    eval_blocks = torch.from_numpy(np.array(run.eval_blocks)).long()  # a copy: memory-mapped
    _, eval_labels = run.mask(eval_blocks, range(len(eval_blocks)), seed=0, epoch=0)
    assert_whole_words(eval_blocks, eval_labels, tokenizer)


def test_whole_word_resume_of_a_random_init_run_reproduces_it(make_config, config_folder):
    # Dropout stays on, and the run starts from scratch: resuming must read the checkpoint's
    # weights, not draw new ones.
    settings = dict(max_steps=6, dropout=0.1, eval_every=3, save_every=2, keep_last=1,
                    whole_word_mask=True, init="random", model=str(config_folder),
                    model_config={"num_hidden_layers": 1})
    train(make_config("wwm-uninterrupted", **settings), environ={})

    config = make_config("wwm-interrupted", **settings)
    summary = fit_with(config, on_forward=sigterm_at(3))
    assert summary["stopped"] and summary["step"] == 3
    summary = train(replace(config, resume="latest"), environ={})
    assert not summary["stopped"] and summary["start_step"] == 3

    expected = read_metrics(Path(config.out_dir).parent / "wwm-uninterrupted")
    resumed = read_metrics(config.out_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    assert by_step(resumed, "train_loss") == by_step(expected, "train_loss")  # bit for bit
    assert by_step(resumed, "eval_loss") == by_step(expected, "eval_loss")
