"""The training loop's own machinery on CPU: how many steps each metrics line covers, the
stop vote across processes, torch.compile as a tested path (1 process, fp16 with the
GradScaler, 2-process gloo DDP) and the choice of process-group backend."""

import os
import socket
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minibert import MinibertError
from minibert.checkpoint import read_checkpoint
from minibert.distributed import CountAndVote, Launch, init
from minibert.train_state import step_checkpoints
from minibert.trainer import train
from test_train import (by_step, cache_dir, config_flags, make_config, read_metrics,  # noqa: F401
                        run_cli, tiny_corpus, tiny_model)


def test_every_metrics_line_says_how_many_steps_it_covers(make_config):
    config = make_config("steps", max_steps=7, log_every=3, eval_every=0, save_every=4,
                         keep_last=0)
    train(config, environ={})
    lines = [r for r in read_metrics(config.out_dir) if "train_loss" in r]
    assert [(r["step"], r["steps"]) for r in lines] == [(3, 3), (6, 3), (7, 1)]

    # Resumed at step 4, the first line (step 6) covers steps 5 and 6 only, and says so.
    train(replace(config, resume=str(step_checkpoints(config.out_dir)[0])), environ={})
    assert step_checkpoints(config.out_dir)[0].name == "step-4"
    lines = [r for r in read_metrics(config.out_dir) if "train_loss" in r]
    assert [(r["step"], r["steps"]) for r in lines] == [(3, 3), (6, 2), (7, 1)]


# ---------------------------------------------------------------------------------------------
# the stop vote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vote_in_two_processes(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init(Launch(rank=rank, world_size=2), "cpu")
    count_and_vote = CountAndVote(torch.device("cpu"))
    # Rank 1 alone is asked to stop during step 2; both ranks learn it at step 3. Rank r
    # counts r + 1 targets a step: 3 over both.
    answers = []
    for step in range(5):
        stop, count = count_and_vote(rank == 1 and step >= 2, torch.tensor(rank + 1))
        answers.append((stop, None if count is None else int(count)))
    count_and_vote.close()
    dist.destroy_process_group()
    results[rank] = answers


def test_stop_vote_is_read_one_step_later_by_every_rank():
    results = mp.Manager().dict()
    mp.spawn(vote_in_two_processes, args=(free_port(), results), nprocs=2)
    assert results[0] == results[1] == [(False, 3)] * 3 + [(True, None)] * 2


def test_stop_vote_in_one_process_answers_at_once():
    count_and_vote = CountAndVote(torch.device("cpu"))
    answers = [count_and_vote(r, torch.tensor(4)) for r in (False, True, False)]
    assert [(stop, int(count)) for stop, count in answers] == [(False, 4), (True, 4), (False, 4)]


def test_dist_backend_choices_are_checked():
    with pytest.raises(MinibertError, match="nccl needs CUDA"):
        init(Launch(), "cpu", "nccl")
    with pytest.raises(MinibertError, match="dist_backend must be one of"):
        init(Launch(), "cpu", "mpi")
    assert init(Launch(), "cpu", "gloo") == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_runs_match(a: list[dict], b: list[dict], rel: float) -> None:
    for key in ("train_loss", "grad_norm", "eval_loss"):
        x, y = by_step(a, key), by_step(b, key)
        assert x.keys() == y.keys() and x, key
        print(f"{key}: largest relative difference {max(abs(x[k] / y[k] - 1) for k in x):.3g}")
        assert all(x[k] == pytest.approx(y[k], rel=rel) for k in x), (key, x, y)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_compiled_steps_match_eager(make_config, fresh_compiler, precision):
    # fp16 is the T4's path: autocast plus the GradScaler, whose overflow check runs inside
    # fused AdamW. Dropout is off: compiled code draws its random numbers differently.
    settings = dict(max_steps=3, eval_every=3, precision=precision, dropout=0.0)
    runs = {}
    for compiled in (False, True):
        config = make_config(f"{precision}-compiled-{compiled}", compile=compiled, **settings)
        summary = train(config, environ={})
        assert summary["step"] == 3
        runs[compiled] = read_metrics(config.out_dir)
    # Compiled kernels fuse and reorder: fp32 rounding over 3 steps, measured <= 1e-7 relative;
    # fp16 rounds each eager op's output to 11 bits (2^-11 = 4.9e-4) where the compiled code
    # keeps fp32 between fused ops: the gradient norm moved by 2e-4 relative.
    assert_runs_match(runs[True], runs[False], rel=1e-5 if precision == "fp32" else 2e-3)


def test_compiled_two_process_gloo_ddp_matches_one_eager_process(make_config):
    # Each rank's micro-batch has the shape of the 1-process fp32 test above (2 x 32): most
    # of its kernels then come from the compiler's on-disk cache rather than the C++
    # compiler (7 new of 31 where a batch of 1 made 19 new; with a cold cache the
    # compiling is most of these tests' time).
    two = make_config("compiled-two-processes", batch_size=2, max_steps=3, eval_every=3,
                      compile=True)
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2", "train.py", *config_flags(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    one = make_config("eager-one-process", batch_size=4, max_steps=3, eval_every=3)
    train(one, environ={})
    assert_runs_match(read_metrics(two.out_dir), read_metrics(one.out_dir), rel=1e-5)


def test_a_failed_compilation_falls_back_to_eager_with_the_same_results(make_config, monkeypatch,
                                                                       capsys, fresh_compiler):
    # As on a GPU whose Triton cannot compile the step: a backend that raises. torch.compile
    # only raises at the first call, inside the first optimizer step; the run must say so in
    # one line and go on exactly as an uncompiled run (dropout on: the RNG must be untouched).
    calls = []

    def broken_backend(graph, example_inputs):
        calls.append(graph)
        raise RuntimeError("no code for this device\nmore detail")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: real_compile(model, backend=broken_backend, **kw))
    settings = dict(max_steps=3, eval_every=3, dropout=0.1, save_every=0)
    failing = make_config("compile-fails", compile=True, **settings)
    summary = train(failing, environ={})
    out = capsys.readouterr().out
    eager = make_config("eager", compile=False, **settings)
    train(eager, environ={})

    assert summary["step"] == 3 and len(calls) == 1  # compiled once, then never again
    warnings = [line for line in out.splitlines() if line.startswith(("warning", "note"))]
    assert warnings == ["warning: compiling the training step failed on the CPU "
                        "(BackendCompilerFailed -> RuntimeError: no code for this device); "
                        "continuing without compile"], out[-2000:]
    # The same eager arithmetic on the same batches and RNG stream: equal to the last bit.
    a, b = read_metrics(failing.out_dir), read_metrics(eager.out_dir)
    for key in ("train_loss", "grad_norm", "eval_loss"):
        assert by_step(a, key) == by_step(b, key) != {}, key
    final = [read_checkpoint(c.out_dir + "/final")[0].state_dict() for c in (failing, eager)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])
