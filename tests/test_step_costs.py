"""What each training step costs besides its compute, checked on the CPU: one collective a
step (the masked-token count and the stop vote together), summed on the host under gloo, and
one compiled graph for a whole run, whole-word masks included. What only a GPU shows (the
host never waits for the device, the NCCL path on a real device) is in tests/test_gpu.py."""

import functools

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from minibert import distributed, trainer
from minibert.batches import prepare_step
from minibert.distributed import CountAndVote
from minibert.optimizer import optimizer_step
from minibert.trainer import build, fit, setup
from test_train import cache_dir, make_config, tiny_corpus, tiny_model  # noqa: F401


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of this process alone (gloo): every collective of the multi-process
    path runs, and sums over one rank."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def record_all_reduces(monkeypatch, calls: list) -> None:
    real = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.clone())
        return real(tensor, *args, **kwargs)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)


def test_one_collective_a_step_between_log_lines(make_config, one_rank_group, monkeypatch):
    # 6 steps, one log line at the end: between the evaluation at step 0 and the log line,
    # a step must make exactly one all-reduce (before: one for the count, one for the vote).
    config = make_config("one-collective", max_steps=6, log_every=6, eval_every=0)
    run = setup(config, environ={})
    trainee = build(config, run)
    calls, steps_done = [], []

    def step_and_count(*args):
        result = optimizer_step(*args)
        steps_done.append(len(calls))  # all-reduces made up to the end of this step
        return result

    monkeypatch.setattr(trainer, "optimizer_step", step_and_count)
    record_all_reduces(monkeypatch, calls)
    fit(config, run, trainee)
    per_step = [b - a for a, b in zip(steps_done, steps_done[1:])]
    assert per_step == [1] * 5, per_step
    # What it sums: [vote, count] on the CPU, this step's masked tokens (one rank here).
    summed = calls[steps_done[1] - 1]
    assert summed.device.type == "cpu" and summed.dtype == torch.int64
    batch = prepare_step(run.train_blocks, run.layout, run.mask, step=1)
    assert summed.tolist() == [0, int(batch.count)]


def recorded_copies(monkeypatch) -> list:
    """distributed's host-to-device copies, recorded and left on the CPU: a stand-in for a
    GPU, whose copies and pinning a CPU build cannot make."""
    events = []

    def to_device(tensor, device):
        events.append(("copy to " + device.type, tensor.tolist()))
        return tensor
    monkeypatch.setattr(distributed, "_to_device", to_device)
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: (
        events.append(("all_reduce on " + tensor.device.type, tensor.tolist()))
        or real(tensor, *args, **kwargs)))
    return events


def test_under_gloo_vote_and_count_are_summed_on_the_host(one_rank_group, monkeypatch):
    # gloo's all-reduce of a CUDA tensor synchronises a stream (a full host wait): the sum
    # runs on the CPU tensor, and only the summed count goes to the GPU.
    events = recorded_copies(monkeypatch)
    count_and_vote = CountAndVote(torch.device("cuda", 0))
    assert count_and_vote(False, torch.tensor(7)) == (False, 7)
    assert events == [("all_reduce on cpu", [0, 7]), ("copy to cuda", 7)]


def test_under_nccl_vote_and_count_go_to_the_device_in_one_copy(one_rank_group, monkeypatch):
    # NCCL reduces device tensors: [vote, count] is copied once, summed there, and the count
    # stays for the loss. On the CPU the device is the CPU; the pinned host copy of the vote
    # and its CUDA event are left to tests/test_gpu.py.
    monkeypatch.setattr(dist, "get_backend", lambda *args: "nccl")
    events = recorded_copies(monkeypatch)
    count_and_vote = CountAndVote(torch.device("cpu"))
    stop, count = count_and_vote(True, torch.tensor(7))
    assert (stop, int(count)) == (False, 7)  # the vote is read at the next step
    assert events == [("copy to cpu", [1, 7]), ("all_reduce on cpu", [1, 7])]
    assert count_and_vote(False, torch.tensor(5)) == (True, None)
    assert len(events) == 2  # stopping starts no collective: every rank leaves before it


def test_one_process_copies_the_count_and_answers_at_once(monkeypatch):
    events = recorded_copies(monkeypatch)
    assert CountAndVote(torch.device("cuda", 0))(True, torch.tensor(7)) == (True, 7)
    assert events == [("copy to cuda", 7)]


def test_a_compiled_whole_word_run_compiles_once(make_config, monkeypatch):
    # A new head width k (the most targets in a row of the step) would fail the compiled
    # graph's shape guard and compile the model again. Whole-word masks fill each row's budget
    # of round(0.15 n) pieces exactly (a word that would overshoot it is skipped for a shorter
    # one), so on full training blocks k is the same at every step, as with token masks:
    # checked here, then that the training forward compiled once. Recompiling is decided by
    # dynamo's guards whatever the backend: "eager" keeps the test to seconds.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    config = make_config("wwm-compiled", whole_word_mask=True, compile=True, max_steps=8,
                         log_every=8, eval_every=0)
    run = setup(config, environ={})
    trainee = build(config, run)
    widths = {prepare_step(run.train_blocks, run.layout, run.mask, step).max_targets
              for step in range(config.max_steps)}
    assert widths == {round(0.15 * (config.max_seq_length - 2))}
    torch._dynamo.reset()
    counters.clear()
    try:
        fit(config, run, trainee)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
