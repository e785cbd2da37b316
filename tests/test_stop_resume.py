"""Stopping and resuming: a second signal stops at once, a stopped run exits 130 / 143, kill -9
at any moment of a run that saves every step resumes exactly, --resume refuses a changed run,
and the cases the plain tests miss: uneven masked counts across ranks, an epoch boundary,
fp16 loss-scaler state, more ranks than evaluation blocks."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import uneven_step_worker
from minibert.batches import BatchLayout
from minibert.errors import MinibertError, StopNow
from minibert.train_config import TrainConfig
from minibert.train_state import (RESUME_CHANGE_WARNS, RESUME_MAY_CHANGE, RESUME_MUST_MATCH,
                                  load_training_state, step_checkpoints)
from minibert.trainer import build, fit, setup, train
from test_train import (REPO, by_step, cache_dir, config_flags, fit_with, make_config,  # noqa: F401
                        sigterm_at, read_metrics, run_cli, tiny_config, tiny_corpus, tiny_model)


def hidden_entries(out_dir) -> list[Path]:
    return [p for p in Path(out_dir).rglob(".*")]


# ---------------------------------------------------------------------------------------------
# A second signal


def test_a_second_signal_stops_at_once_in_the_middle_of_an_evaluation(make_config, monkeypatch):
    config = make_config("second-signal-eval", max_steps=4, eval_every=2, eval_batch_size=1)
    run = setup(config, environ={})
    trainee = build(config, run)
    evaluated = []
    masked_logits = trainee.model.masked_logits

    def evaluation_forward(*args, **kwargs):  # evaluate() calls masked_logits per batch
        evaluated.append(1)
        if len(evaluated) == len(run.eval_blocks) + 2:  # 2nd batch of the step-2 evaluation
            os.kill(os.getpid(), signal.SIGTERM)  # first: save after this step ...
            os.kill(os.getpid(), signal.SIGTERM)  # ... second: stop now
        return masked_logits(*args, **kwargs)

    monkeypatch.setattr(trainee.model, "masked_logits", evaluation_forward)
    with pytest.raises(StopNow):
        fit(config, run, trainee)
    assert len(evaluated) == len(run.eval_blocks) + 2  # the evaluation went no further
    assert step_checkpoints(config.out_dir) == []  # nothing saved ...
    assert hidden_entries(config.out_dir) == []  # ... and nothing half-written
    assert max(r["step"] for r in read_metrics(config.out_dir)) == 1  # no line for step 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back


def test_a_second_signal_during_a_save_leaves_the_last_checkpoint(make_config, monkeypatch):
    config = make_config("second-signal-save", max_steps=6, eval_every=0, save_every=2,
                         keep_last=1)
    real_save = torch.save

    def save_with_second_signal(*args, **kwargs):  # torch.save writes training_state.pt
        if "step-3" in str(args[1]):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_with_second_signal)
    with pytest.raises(StopNow):
        fit_with(config, on_forward=sigterm_at(3))  # the first: save at step 3, then stop
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in step_checkpoints(config.out_dir)] == ["step-2"]
    assert hidden_entries(config.out_dir) == []
    summary = train(replace(config, resume="latest"), environ={})
    assert summary["start_step"] == 2 and summary["step"] == 6


# ---------------------------------------------------------------------------------------------
# Exit status of a stopped run


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_saves_then_exits_with_128_plus_the_signal(make_config, signum, status):
    config = make_config(f"exit-{signum}", max_steps=10_000, eval_every=0)
    metrics = Path(config.out_dir) / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, "train.py", *config_flags(config)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not (
            metrics.is_file() and "train_loss" in metrics.read_text()):
        time.sleep(0.1)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-2000:]
    step = int(stdout.split("stopped at step ")[1].split(";")[0])
    assert [p.name for p in step_checkpoints(config.out_dir)] == [f"step-{step}"]
    assert not (Path(config.out_dir) / "final").exists()


# ---------------------------------------------------------------------------------------------
# kill -9 at random moments of a run that saves every step


def newest_step(out_dir) -> int:
    """The step of out_dir's newest checkpoint, 0 without one."""
    return max((int(p.name.split("-")[1]) for p in step_checkpoints(out_dir)), default=0)


def test_kill_9_at_any_moment_resumes_exactly(make_config):
    settings = dict(max_steps=12, save_every=1, keep_last=2, eval_every=6, dropout=0.1)
    train(make_config("never-killed", **settings), environ={})
    expected = read_metrics(Path(make_config("never-killed").out_dir))

    config = make_config("killed", **settings)
    rng = random.Random(5)
    killed_at = []
    for attempt in range(3):  # kill, resume, kill, ... at seeded random moments
        flags = config_flags(replace(config, resume="latest" if attempt else None))
        process = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        # 1-3 steps past where this process starts, then a random moment within a step
        # (a checkpoint is saved every step: saving takes most of it). The step of the newest
        # checkpoint, not their count: keep_last holds the count at 2.
        target = newest_step(config.out_dir) + rng.randint(1, 3)
        deadline = time.time() + 120
        while (time.time() < deadline and process.poll() is None
               and newest_step(config.out_dir) < target):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        process.kill()
        assert process.wait() == -signal.SIGKILL, "the run ended before it was killed"
        killed_at.append(newest_step(config.out_dir))
    summary = train(replace(config, resume="latest"), environ={})
    print(f"killed with the newest checkpoint at steps {killed_at}; the last resume started at "
          f"step {summary['start_step']} of 12")
    assert summary["start_step"] < 12  # the kills fell inside the run
    resumed = read_metrics(config.out_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    assert by_step(resumed, "train_loss") == by_step(expected, "train_loss")  # bit for bit
    assert by_step(resumed, "eval_loss") == by_step(expected, "eval_loss")
    assert hidden_entries(config.out_dir) == []


# ---------------------------------------------------------------------------------------------
# What --resume accepts


def test_every_setting_has_a_rule_on_resume():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    groups = [set(RESUME_MUST_MATCH), set(RESUME_MAY_CHANGE), set(RESUME_CHANGE_WARNS)]
    classified = set().union(*groups)
    assert names - classified == set(), "TrainConfig fields without a rule on resume"
    assert classified - names == set(), "rules for settings that are not TrainConfig fields"
    assert sum(len(g) for g in groups) == len(classified), "a setting in two groups"


@pytest.fixture(scope="module")
def finished_two_step_run(tiny_model, tiny_corpus, cache_dir, tmp_path_factory) -> TrainConfig:
    """A finished 2-step run, trained once; tests resume from a copy of it."""
    config = tiny_config(tiny_model, tiny_corpus, cache_dir,
                         tmp_path_factory.mktemp("finished") / "run", max_steps=2, eval_every=0)
    train(config, environ={})
    return config


@pytest.mark.parametrize("change", [dict(seed=4), dict(mlm_probability=0.3), dict(dropout=0.2),
                                    dict(max_seq_length=16)])
def test_resume_refuses_a_setting_that_changes_the_run(finished_two_step_run, tmp_path, change):
    config = replace(finished_two_step_run, out_dir=str(tmp_path / "changed"))
    shutil.copytree(finished_two_step_run.out_dir, config.out_dir)  # out_dir may change
    (name, value), = change.items()
    with pytest.raises(MinibertError) as error:
        train(replace(config, resume="latest", max_steps=4, **change), environ={})
    message = str(error.value)
    assert name in message and repr(value) in message and repr(getattr(config, name)) in message
    assert "\n" not in message


def test_resume_applies_a_new_lr_and_says_how_the_schedule_moves(make_config, capsys):
    config = make_config("extended", max_steps=4, eval_every=0, warmup_steps=1)
    train(config, environ={})
    capsys.readouterr()
    resumed = replace(config, resume="latest", max_steps=8, lr=5e-4, weight_decay=0.1)
    train(resumed, environ={})
    out = capsys.readouterr().out
    assert "note: resuming with lr 0.001 -> 0.0005" in out
    assert "note: resuming with weight_decay 0.01 -> 0.1" in out
    # after 4 of 4 steps the stopped run's schedule had reached 0; the new one decays to step 8
    assert "step 5 uses lr 0.000286 where the stopped run would have used 0" in out
    lrs = by_step(read_metrics(config.out_dir), "lr")
    assert lrs[5] == pytest.approx(5e-4 * (8 - 4) / (8 - 1), rel=1e-12)  # float64, reordered
    state = load_training_state(step_checkpoints(config.out_dir)[-1])
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1


def test_resume_with_the_same_settings_says_nothing(make_config, capsys):
    config = make_config("same", max_steps=4, eval_every=0)
    fit_with(config, on_forward=sigterm_at(2))
    capsys.readouterr()
    train(replace(config, resume="latest"), environ={})
    assert "note:" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# An epoch boundary, and a resume across it


def test_a_run_crosses_an_epoch_boundary_and_resumes_across_it(make_config):
    config = make_config("epochs", batch_size=4, eval_every=0)
    per_epoch = setup(config, environ={}).steps_per_epoch
    assert 5 <= per_epoch <= 20
    layout = BatchLayout(num_blocks=per_epoch * 4 + 1, batch_size=4, grad_accum=1, seed=3)
    assert not np.array_equal(layout.rows(0, 0), layout.rows(1, 0))  # a new permutation
    run = setup(config, environ={})
    assert run.layout.epoch_and_step(per_epoch) == (1, 0)  # ... which the run reads from here

    settings = dict(max_steps=per_epoch + 3, save_every=per_epoch - 1, keep_last=0)
    train(make_config("epochs-uninterrupted", batch_size=4, eval_every=0, **settings),
          environ={})
    interrupted = make_config("epochs-interrupted", batch_size=4, eval_every=0, **settings)
    summary = fit_with(interrupted, on_forward=sigterm_at(per_epoch - 1))
    assert summary["stopped"] and summary["step"] == per_epoch - 1  # the epoch's last step next
    train(replace(interrupted, resume="latest"), environ={})

    expected = read_metrics(Path(interrupted.out_dir).parent / "epochs-uninterrupted")
    resumed = read_metrics(interrupted.out_dir)
    assert [r["step"] for r in resumed] == list(range(per_epoch + 4))
    assert by_step(resumed, "train_loss") == by_step(expected, "train_loss")  # bit for bit
    assert by_step(resumed, "eval_loss") == by_step(expected, "eval_loss")


def test_a_block_gets_new_masks_in_a_new_epoch(make_config):
    run = setup(make_config("masks", batch_size=4), environ={})
    block = torch.from_numpy(np.array(run.train_blocks[:1])).long()
    _, epoch0 = run.mask(block, [0], seed=3, epoch=0)
    _, epoch1 = run.mask(block, [0], seed=3, epoch=1)
    _, again = run.mask(block, [0], seed=3, epoch=1)
    assert not torch.equal(epoch0, epoch1) and torch.equal(epoch1, again)


# ---------------------------------------------------------------------------------------------
# fp16: the loss scaler's state survives a resume


def test_fp16_loss_scale_and_growth_tracker_survive_a_resume(make_config):
    def inf_gradient_at_step_1(trainee):
        calls = []

        def hook(grad):
            calls.append(1)
            return grad * float("inf") if len(calls) == 1 else grad

        trainee.model.word_embeddings.register_hook(hook)

    scalers = {}
    for name, stop in (("fp16-uninterrupted", None), ("fp16-interrupted", 3)):
        config = make_config(name, precision="fp16", max_steps=6, eval_every=0, save_every=0)
        kept = {}
        summary = fit_with(config, on_forward=sigterm_at(stop) if stop else None,
                           prepare=lambda trainee: (inf_gradient_at_step_1(trainee),
                                                    kept.update(trainee=trainee)))
        if stop:
            assert summary["stopped"] and summary["step"] == 3
            saved = load_training_state(step_checkpoints(config.out_dir)[-1])["scaler"]
            assert saved["scale"] == 65536.0 / 2 and saved["_growth_tracker"] == 2
            run = setup(replace(config, resume="latest"), environ={})
            trainee = build(replace(config, resume="latest"), run)
            assert trainee.scaler.state_dict() == saved  # restored exactly
            fit(replace(config, resume="latest"), run, trainee)
        else:
            trainee = kept["trainee"]
        scalers[name] = trainee.scaler.state_dict()
    assert scalers["fp16-interrupted"] == scalers["fp16-uninterrupted"]
    assert scalers["fp16-uninterrupted"]["_growth_tracker"] == 5  # 5 clean steps after the skip
    records = {name: read_metrics(Path(make_config(name).out_dir)) for name in scalers}
    assert by_step(records["fp16-interrupted"], "loss_scale") == by_step(
        records["fp16-uninterrupted"], "loss_scale")


# ---------------------------------------------------------------------------------------------
# 2 processes: uneven masked counts per rank; more ranks than evaluation blocks


def test_two_ranks_with_uneven_masked_counts_give_the_one_process_gradient(make_config, tmp_path):
    """Each rank holds a different number of masked tokens; the gradient of 2 processes x 2
    sequences equals 1 process x 4. One evaluation block for 2 ranks: rank 1's share is empty,
    and the evaluation still equals the single process's."""
    settings = dict(max_steps=1, eval_every=0, max_grad_norm=0.0, eval_max_blocks=1)
    two = make_config("uneven-two", batch_size=2, **settings)
    one = make_config("uneven-one", batch_size=4, **settings)
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2", "tests/uneven_step_worker.py",
                      json.dumps(dataclasses.asdict(two)), str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "one").mkdir()
    uneven_step_worker.main(one, tmp_path / "one", environ={})

    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in (0, 1)]
    single = torch.load(tmp_path / "one" / "rank-0.pt")
    assert ranks[0]["count"] != ranks[1]["count"]  # the case the plain test cannot catch
    assert ranks[0]["count"] + ranks[1]["count"] == single["count"]
    for name, gradient in single["grads"].items():
        scale = gradient.abs().max().item()  # fp32 sums in another order: rounding only
        for rank in ranks:
            difference = (rank["grads"][name] - gradient).abs().max().item()
            assert difference <= 1e-5 * scale + 1e-9, (name, difference, scale)
    # Both ranks report the all-reduced sums: the same numbers (2 terms: a + b == b + a).
    assert ranks[0]["evals"] == ranks[1]["evals"]
    for step, result in single["evals"].items():
        got = ranks[0]["evals"][step]
        assert got.keys() == result.keys() and got["eval_masking"] == result["eval_masking"]
        # After step 1 the weights differ by one AdamW step on gradients that differ by
        # rounding: the loss (~10, float32 logits) agrees to ~10 float32 ulps, and
        # perplexity = exp(loss) to that absolute loss difference, i.e. relative loss x 1e-6.
        assert got["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-6), step
        assert got["eval_perplexity"] == pytest.approx(
            result["eval_perplexity"], rel=1e-6 * max(1.0, result["eval_loss"])), step
        assert got["eval_accuracy"] == pytest.approx(result["eval_accuracy"], rel=1e-6), step


def test_checkpoints_after_a_resume_keep_their_vocabulary(make_config):
    """A resumed run reads its tokenizer from the checkpoint it resumed from; pruning deletes
    that folder, and later checkpoints must still get vocab.txt."""
    config = make_config("vocab", max_steps=2, eval_every=0, save_every=1, keep_last=1)
    train(config, environ={})
    train(replace(config, resume="latest", max_steps=4), environ={})
    assert [p.name for p in step_checkpoints(config.out_dir)] == ["step-4"]
    for folder in (step_checkpoints(config.out_dir)[-1] / "model", Path(config.out_dir) / "final"):
        assert (folder / "vocab.txt").is_file(), folder
