"""The training loop on CPU with a tiny random BERT and a tiny corpus: exact equivalence of
1 process / 2 processes / gradient accumulation, exact resume, fp16 loss scaling, exact
evaluation, outputs, and the command-line and config-file surface."""

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minibert import BertConfig, BertForMaskedLM, MinibertError, load_tokenizer
from minibert.checkpoint import read_checkpoint, resolve, save_pretrained
from minibert.distributed import Launch
from minibert.masking import IGNORE_INDEX, mask_batch, special_token_ids
from minibert import plot, splits
from minibert.train_config import TrainConfig, parse_config, read_toml
from minibert.train_state import load_training_state, step_checkpoints
from minibert.batches import BatchLayout
from minibert.evaluate import evaluate
from minibert.optimizer import linear_schedule, parameter_groups
from minibert.train_cli import main as train_main
from minibert.trainer import build, fit, setup, train

from conftest import call_main

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
VOCAB_SOURCE = ASSETS / "checkpoints" / "bert-tiny-splade-mlm"
CORPUS = ASSETS / "corpus" / "wikipedia-sample"
SEQ = 32


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer, hidden-32 BERT with the real bert-base-uncased vocabulary."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("model") / "tiny-bert"
    save_pretrained(BertForMaskedLM(config), folder, tokenizer_source=VOCAB_SOURCE)
    return folder


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """About 40 training blocks and 7 validation blocks of 32 tokens (an odd count, so that
    2 ranks get uneven evaluation shares)."""
    folder = tmp_path_factory.mktemp("corpus")
    train_text = (CORPUS / "train.txt").read_text(encoding="utf-8")[:6000]
    valid_text = (CORPUS / "valid.txt").read_text(encoding="utf-8")[:1200]
    (folder / "train.txt").write_text(train_text.rsplit("\n", 1)[0] + "\n", encoding="utf-8")
    (folder / "valid.txt").write_text(valid_text.rsplit(" ", 1)[0] + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(model: Path, corpus: Path, cache: Path, out_dir: Path, /,
                **overrides) -> TrainConfig:
    """A run of the tiny model on the tiny corpus: 4 steps of 2 x 32 tokens, fp32 on the CPU."""
    base = dict(model=str(model), data=str(corpus), out_dir=str(out_dir), cache_dir=str(cache),
                max_seq_length=SEQ, batch_size=2, grad_accum=1, max_steps=4, lr=1e-3,
                warmup_steps=1, precision="fp32", device="cpu", dropout=0.0, log_every=1,
                eval_every=2, save_every=0, seed=3)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def make_config(tiny_model, tiny_corpus, cache_dir, tmp_path):
    def make(name: str, **overrides) -> TrainConfig:
        return tiny_config(tiny_model, tiny_corpus, cache_dir, tmp_path / name, **overrides)
    return make


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[k] - b[k]) for k in a)


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


def config_flags(config: TrainConfig) -> list[str]:
    flags = []
    for key, value in vars(config).items():
        if value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def fit_with(config: TrainConfig, on_forward=None, prepare=None) -> dict:
    """setup -> build -> fit, calling on_forward(n) before the n-th training forward (1-based)
    and prepare(trainee) before fit."""
    run = setup(config, environ={})
    trainee = build(config, run)
    if prepare:
        prepare(trainee)
    forwards = []

    def hook(module, args):
        forwards.append(1)
        if on_forward:
            on_forward(len(forwards))

    handle = trainee.model.register_forward_pre_hook(hook)
    try:
        return fit(config, run, trainee)
    finally:
        handle.remove()


def sigterm_at(forward: int):
    """An on_forward for fit_with: SIGTERM during that training forward. The handler lets the
    step finish, then the run saves a checkpoint and stops."""
    def on_forward(n):
        if n == forward:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_forward


# ---------------------------------------------------------------------------------------------
# 1 process x 2b == 2 processes x b == 1 process x b x grad_accum 2


def test_two_processes_equal_one_process_and_accumulation(make_config):
    two = make_config("two-processes", batch_size=2, eval_every=4)
    # and 2 processes x batch 1 x grad_accum 2: DDP's no_sync on the first micro-batch
    two_accumulating = make_config("two-processes-accumulation", batch_size=1, grad_accum=2,
                                   eval_every=4)
    for config in (two, two_accumulating):
        result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "train.py", *config_flags(config)])
        assert result.returncode == 0, result.stderr[-3000:]
    train(make_config("one-process", batch_size=4, eval_every=4), environ={})
    train(make_config("accumulation", batch_size=2, grad_accum=2, eval_every=4), environ={})

    runs = {name: read_metrics(Path(two.out_dir).parent / name)
            for name in ("two-processes", "two-processes-accumulation", "one-process",
                         "accumulation")}
    reference = by_step(runs["one-process"], "train_loss")
    assert len(reference) == 4
    for name in ("two-processes", "two-processes-accumulation", "accumulation"):
        difference = max_difference(by_step(runs[name], "train_loss"), reference)
        print(f"max train-loss difference, {name} vs one process: {difference:.3g}")
        assert difference < 1e-5
        eval_difference = max_difference(by_step(runs[name], "eval_loss"),
                                         by_step(runs["one-process"], "eval_loss"))
        print(f"max eval-loss difference, {name} vs one process: {eval_difference:.3g}")
        assert eval_difference < 1e-5
        # AdamW hardly sees a constant factor on the gradient (a forgotten x world_size), but
        # the logged gradient norm does.
        norms = by_step(runs[name], "grad_norm")
        reference_norms = by_step(runs["one-process"], "grad_norm")
        assert all(norms[k] == pytest.approx(reference_norms[k], rel=1e-5) for k in norms)
    # The 2-process checkpoint holds one RNG state per rank.
    state = load_training_state(step_checkpoints(two.out_dir)[-1])
    assert len(state["rng_states"]) == 2 and state["position"].step == 4


def test_loss_is_normalised_by_the_masked_tokens_of_the_whole_step(make_config):
    """Full blocks all get the same number of targets, so a mean of per-micro-batch means
    would equal the right loss by luck. Give row i only 1 + i % 5 targets to tell them apart."""
    def uneven(mask):
        def masked(input_ids, indices, **kwargs):
            inputs, labels = mask(input_ids, indices, **kwargs)
            for row, index in enumerate(indices):
                targets = (labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
                labels[row, targets[1 + int(index) % 5:]] = IGNORE_INDEX
            return inputs, labels
        return masked

    results = {}
    for name, batch_size, grad_accum in (("large-batch", 4, 1), ("accumulated", 2, 2)):
        config = make_config(name, batch_size=batch_size, grad_accum=grad_accum, eval_every=0,
                             max_grad_norm=0.0)
        run = setup(config, environ={})
        run.mask = uneven(run.mask)
        fit(config, run, build(config, run))
        results[name] = read_metrics(config.out_dir)
    for key in ("train_loss", "grad_norm"):
        a, b = (by_step(results[name], key) for name in ("large-batch", "accumulated"))
        assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a), key


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_reproduces_the_uninterrupted_run(make_config):
    # Dropout stays on: the RNG state must be restored too, not only weights and optimizer.
    settings = dict(max_steps=6, dropout=0.1, eval_every=3, save_every=2, keep_last=1)
    train(make_config("uninterrupted", **settings), environ={})

    config = make_config("interrupted", **settings)
    # SIGTERM during step 3's forward: the handler lets the step finish, then it stops.
    summary = fit_with(config, on_forward=sigterm_at(3))
    assert summary["stopped"] and summary["step"] == 3
    assert [p.name for p in step_checkpoints(config.out_dir)] == ["step-3"]  # keep_last 1
    assert not (Path(config.out_dir) / "final").exists()

    summary = train(replace(config, resume="latest"), environ={})
    assert not summary["stopped"] and summary["start_step"] == 3

    expected = read_metrics(Path(config.out_dir).parent / "uninterrupted")
    resumed = read_metrics(config.out_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]  # no step twice
    # The same computation on the same weights, optimizer state, RNG state and batches: the
    # resumed run repeats the uninterrupted one bit for bit.
    assert by_step(resumed, "train_loss") == by_step(expected, "train_loss")
    assert by_step(resumed, "eval_loss") == by_step(expected, "eval_loss")


def test_fresh_run_refuses_an_out_dir_with_checkpoints(make_config):
    config = make_config("twice", max_steps=2)
    train(config, environ={})
    with pytest.raises(MinibertError, match="--resume"):
        train(config, environ={})
    train(replace(config, overwrite=True), environ={})  # --overwrite starts afresh


# ---------------------------------------------------------------------------------------------
# fp16 with loss scaling


def test_fp16_grad_scaler_skips_steps_with_inf_gradients(make_config):
    config = make_config("fp16", precision="fp16", max_steps=3, eval_every=0)
    run = setup(config, environ={})
    trainee = build(config, run)
    assert trainee.scaler.is_enabled()
    backward_calls = []

    def inf_on_first_backward(grad):
        backward_calls.append(1)
        return grad * float("inf") if len(backward_calls) == 1 else grad

    weight = trainee.model.word_embeddings
    weight.register_hook(inf_on_first_backward)
    fit(config, run, trainee)

    records = [r for r in read_metrics(config.out_dir) if "train_loss" in r]
    assert records[0]["grad_norm"] is None  # step 1 overflowed (inf is logged as null)
    assert records[0]["loss_scale"] == 65536.0 / 2  # ... so the scale was halved
    assert records[1]["loss_scale"] == 65536.0 / 2  # steps 2 and 3 were fine
    assert all(math.isfinite(r["train_loss"]) for r in records)
    # Step 1 was skipped: AdamW ran twice, and no weight holds NaN or inf.
    assert trainee.optimizer.state[weight]["step"].item() == 2
    assert all(torch.isfinite(p).all() for p in trainee.model.parameters())


# ---------------------------------------------------------------------------------------------
# evaluation


def test_eval_perplexity_is_exp_of_summed_nll_over_count(tiny_model):
    model, folder, _ = read_checkpoint(tiny_model)
    tokenizer = load_tokenizer(folder)
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(1000, 30000, (5, 16), generator=generator)
    blocks[:, 0], blocks[:, -1] = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    mask = partial(mask_batch, mask_token_id=tokenizer.token_to_id("[MASK]"),
                   special_token_ids=special_token_ids(tokenizer), vocab_size=30522)

    result = evaluate(model, blocks.numpy(), mask, seed=7, batch_size=2,
                      device=torch.device("cpu"), precision="fp32")

    nll, count, correct = 0.0, 0, 0
    for index in range(len(blocks)):  # by hand: one block at a time, full logits
        inputs, labels = mask(blocks[index:index + 1], [index], seed=7, epoch=0)
        logits = model(inputs)[0]  # (seq, vocab)
        chosen = labels[0] != IGNORE_INDEX
        nll += F.cross_entropy(logits[chosen], labels[0][chosen], reduction="sum").item()
        count += int(chosen.sum())
        correct += int((logits[chosen].argmax(-1) == labels[0][chosen]).sum())
    # Batches of 2 against one block at a time, head at the masked positions against the full
    # logits: float32 rounding, ~1e-7 of the loss. exp() turns the loss's absolute difference
    # into perplexity's relative one: relative 1e-6 of the loss is 1e-6 x loss of perplexity.
    assert result["eval_loss"] == pytest.approx(nll / count, rel=1e-6)
    assert result["eval_perplexity"] == pytest.approx(math.exp(nll / count),
                                                      rel=1e-6 * nll / count)
    assert result["eval_accuracy"] == correct / count
    # The same masks every time: a second evaluation gives the same numbers.
    again = evaluate(model, blocks.numpy(), mask, seed=7, batch_size=3,
                     device=torch.device("cpu"), precision="fp32")
    assert again["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# outputs


def test_outputs_loss_falls_and_final_checkpoint_reads_back(make_config, tmp_path):
    config = make_config("outputs", max_steps=8, eval_every=4, lr=1e-2, save_every=4)
    summary = train(config, environ={})
    out = Path(config.out_dir)
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(9))
    train_lines = [r for r in records if "train_loss" in r]
    for key in ("train_loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(isinstance(r[key], float) for r in train_lines), key
    evals = by_step(records, "eval_loss")
    assert sorted(evals) == [0, 4, 8]
    assert evals[8] < evals[0]  # it learns
    assert all("eval_perplexity" in r and "eval_accuracy" in r for r in records if "eval_loss" in r)
    assert summary["evals"][8]["eval_loss"] == evals[8]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in step_checkpoints(out)] == ["step-4", "step-8"]

    final, _, _ = read_checkpoint(out / "final")
    assert (out / "final" / "vocab.txt").is_file()
    saved, _, _ = read_checkpoint(out / "checkpoints" / "step-8" / "model")
    for (name, a), b in zip(final.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name
    plot.run(plot.parse_args([str(out), str(out), "-o", str(tmp_path / "compare.png")]))
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_max_seq_length_above_the_model_positions_is_a_one_line_error(make_config):
    with pytest.raises(MinibertError, match="max_position_embeddings"):
        train(make_config("too-long", max_seq_length=128), environ={})


# ---------------------------------------------------------------------------------------------
# building blocks


def test_each_step_uses_the_same_global_batch_for_any_split_across_ranks(make_config):
    def rows(world, batch, accum):
        """Sorted block indices of each step of epoch 0, gathered over ranks and micro-batches."""
        layouts = [BatchLayout(num_blocks=100, batch_size=batch, grad_accum=accum,
                               world_size=world, rank=rank, seed=5) for rank in range(world)]
        return [sorted(np.concatenate([layout.rows(0, step).reshape(-1) for layout in layouts])
                       .tolist()) for step in range(layouts[0].steps_per_epoch)]

    reference = rows(1, 8, 1)
    assert len(reference) == 12  # 100 // 8: the partial last batch is dropped
    assert rows(2, 4, 1) == reference == rows(1, 4, 2) == rows(2, 2, 2)
    assert len({i for step in reference for i in step}) == 96  # no block twice in an epoch


def test_schedule_warms_up_then_decays_linearly():
    factor = linear_schedule(warmup_steps=4, total_steps=10)
    values = [factor(i) for i in range(10)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4:] == [1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]  # the same divisions
    assert linear_schedule(0, 4)(0) == 1.0


def test_no_weight_decay_on_biases_and_layernorm(tiny_model):
    model, _, _ = read_checkpoint(tiny_model)
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert all(n.endswith("bias") or "norm" in n for n in no_decay_names)
    assert "bert.embeddings.layer_norm.weight" in no_decay_names
    assert "bert.layers.0.attention.qkv.bias" in no_decay_names and "mlm_head.bias" in no_decay_names
    assert {names[id(p)] for p in decay["params"]} >= {"bert.layers.0.attention.qkv.weight",
                                                       "bert.embeddings.word_embeddings.weight"}


# ---------------------------------------------------------------------------------------------
# command line and config files


def test_help_shows_commands_and_every_setting():
    result = run_cli([sys.executable, "train.py", "--help"])
    assert result.returncode == 0, result.stderr
    assert "torchrun --nproc_per_node=2" in result.stdout
    for flag in ("--batch_size", "--grad_accum", "--precision", "--resume", "--eval_every"):
        assert flag in result.stdout
    assert "sequences per micro-batch on each process" in result.stdout  # the field's comment


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    config = parse_config(["--config", str(path)])
    assert read_toml(path)  # every key is a TrainConfig field
    assert config.max_seq_length in (128, 512)


def test_the_online_quickstart_is_the_offline_one_with_hub_ids():
    """configs/quickstart-online.toml names the hubs' copies of what the offline quick start
    reads from ../shared/assets, and changes nothing else. Downloading them cannot be tested
    here (no network reaches the hubs), so the ids are checked as far as they can be offline:
    the model is one of Google's BERT miniatures, named L-layers_H-hidden_A-heads, of the
    offline checkpoint's shape, and an id that the checkpoint reader fetches from the hub (a
    machine online fetches its config.json and vocab.txt here); the data is the WikiText name
    that minibert/splits.py reads from the hub."""
    offline = parse_config(["--config", str(REPO / "configs" / "quickstart-cpu.toml")])
    online = parse_config(["--config", str(REPO / "configs" / "quickstart-online.toml")])
    assert replace(online, model=offline.model, data=offline.data) == offline
    assert online.data == "wikitext-2-raw-v1" and online.data in splits.WIKITEXT_NAMES
    assert online.model.startswith("google/bert_uncased_"), online.model
    shape = dict(part.split("-") for part in online.model.split("_", 2)[2].split("_"))  # L-2...
    try:  # the checkpoint reader takes it to the hub: offline, it says it could not fetch it
        resolve(online.model, weights=False)
    except MinibertError as error:
        assert "the hub id could not be fetched" in str(error), error
    tiny = json.loads((REPO / offline.model / "config.json").read_text(encoding="utf-8"))
    assert {name: int(value) for name, value in shape.items()} == {
        "L": tiny["num_hidden_layers"], "H": tiny["hidden_size"], "A": tiny["num_attention_heads"]}


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('lr = 1e-4\nbatch_size = 4\nresume = true\ndropout = 0.0\n')
    config = parse_config(["--config", str(file), "--batch_size", "16", "--max_steps", "9"])
    assert (config.lr, config.batch_size, config.max_steps) == (1e-4, 16, 9)
    assert config.grad_accum == TrainConfig().grad_accum and config.resume == "latest"
    assert parse_config(["--resume"]).resume == "latest"
    assert parse_config(["--resume", "runs/x/checkpoints/step-5"]).resume.endswith("step-5")
    assert parse_config(["--dropout", "none"]).dropout is None
    assert parse_config(["--overwrite"]).overwrite is True


@pytest.mark.parametrize("text, message", [
    ("batch_size = 0\n", "batch_size must be >= 1"),
    ("precision = 'fp8'\n", "precision must be one of"),
    ("dist_backend = 'mpi'\n", "dist_backend must be one of"),
    ("lr = 'fast'\n", "lr must be float"),
    ("learning_rate = 1e-4\n", "unknown setting learning_rate"),
    ("lr = \n", "not valid TOML"),
])
def test_bad_config_file_is_a_one_line_error(tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(MinibertError, match=message):
        parse_config(["--config", str(file)])



# Python 3.10 has no tomllib: setup.cfg installs tomli there, the package tomllib was made from
# (PEP 680: same loads and TOMLDecodeError). Here tomllib is hidden, and a module named tomli
# that hands on tomllib's own functions (counting the calls) stands in for the package.
WITHOUT_TOMLLIB = """
import sys, tomllib, types
calls = []
tomli = types.ModuleType("tomli")
tomli.TOMLDecodeError = tomllib.TOMLDecodeError
tomli.loads = lambda text, **kw: calls.append(text) or tomllib.loads(text, **kw)
sys.modules["tomli"], sys.modules["tomllib"] = tomli, None  # None: `import tomllib` fails
from minibert.errors import MinibertError
from minibert.train_config import parse_config
config = parse_config(["--config", sys.argv[1], "--model_config", "{hidden_size = 64}",
                       "--init", "random"])
assert (config.lr, config.model_config) == (1e-4, {"hidden_size": 64}), config
try:
    parse_config(["--config", sys.argv[2]])
except MinibertError as error:
    assert "not valid TOML" in str(error), error
else:
    raise AssertionError("bad TOML was read")
assert len(calls) == 3, calls
print("read through tomli")
"""


def test_config_files_are_read_without_tomllib(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("lr = 1e-4\n")
    bad.write_text("lr = \n")
    result = run_cli([sys.executable, "-c", WITHOUT_TOMLLIB, str(good), str(bad)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "read through tomli\n"


def test_bad_flags_are_one_line_errors_from_the_script(tmp_path, monkeypatch, capsys):
    # train.py's main in this process (tests/test_cli.py runs the script itself in a real
    # process with a bad flag).
    for args, message in ((["--lrr", "1e-4"], "unknown setting --lrr (did you mean --lr?)"),
                          (["--batch_size", "two"], "batch_size must be int"),
                          (["--config", str(tmp_path / "missing.toml")], "no such config file")):
        status, stdout, stderr = call_main(train_main, monkeypatch, capsys, *args)
        assert status == 1 and stdout == ""
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
