"""The training loop on a GPU: what a CPU cannot show.

- no host-device synchronisation between two log lines (one process; see its scope below);
- the stop vote under NCCL: answered one step later, a call far cheaper than a step;
- the prefetch thread on the run's device;
- the compiled fixed-shape head (a Triton sort on GPUs) against the eager boolean path;
- the 2-process CUDA path (gloo, both processes sharing one GPU) equal to 1 process, and a
  compiled whole-word 2-process run that recompiles at most once per rank;
- a SIGTERM that ends a long run within seconds (the prefetch thread stops at once).

Skipped where torch sees no CUDA device; benchmarks/gpu_session.sh runs them on a GPU machine,
each as a part of its own. Lines starting with "RESULT" are the numbers it records.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minibert import trainer
from minibert.batches import BatchLayout, Prefetcher, step_batch
from minibert.distributed import CountAndVote
from minibert.model import BertConfig, BertForMaskedLM
from minibert.optimizer import optimizer_step
from minibert.trainer import build, fit, setup, train
from test_batches import toy_blocks, toy_mask
from test_train import (ASSETS, REPO, by_step, cache_dir, config_flags,  # noqa: F401
                        make_config, max_difference, read_metrics, run_cli, tiny_corpus,
                        tiny_model)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch sees none)")

CORPUS = ASSETS / "corpus" / "wikipedia-sample"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------
# no host-device sync between log lines


@pytest.mark.parametrize("precision, compiled", [("bf16", False), ("fp16", False),
                                                 ("bf16", True)])
def test_no_host_device_sync_between_log_lines(make_config, monkeypatch, precision, compiled):
    # grad_accum 2 exercises no_sync and the count division; fp16 the GradScaler. The sync
    # check is on from the end of step 2 (compiling and first allocations are done) to the
    # end of step 5: steps 3 to 5 whole, batches, count and vote, forward, backward, AdamW.
    #
    # Scope. One process: the stop vote is answered at once, without a collective, so the
    # path of several processes (the vote read a step later through a CUDA event) is not
    # exercised here; and waiting on a CUDA event is not a call that set_sync_debug_mode
    # reports. test_stop_vote_under_nccl_answers_a_step_later_at_little_cost covers it.
    config = make_config(f"sync-{precision}-{compiled}", device="cuda", precision=precision,
                         grad_accum=2, max_steps=6, log_every=6, eval_every=0, dropout=0.1,
                         compile=compiled)
    run = setup(config, environ={})
    trainee = build(config, run)
    steps_done = []

    def step_and_toggle(*args):
        result = optimizer_step(*args)
        steps_done.append(1)
        if len(steps_done) == 2:
            torch.cuda.set_sync_debug_mode("warn")
        elif len(steps_done) == 5:
            torch.cuda.set_sync_debug_mode("default")
        return result

    monkeypatch.setattr(trainer, "optimizer_step", step_and_toggle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit(config, run, trainee)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
             if "synchroniz" in str(w.message)]
    assert len(steps_done) == 6
    assert not syncs, "\n".join(syncs)


def test_sync_check_sees_a_sync():
    # The check above must be able to fail: .item() on a CUDA tensor is a synchronisation.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            torch.ones(1, device="cuda").item()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert any("synchroniz" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------
# the stop vote under NCCL


@pytest.fixture
def one_rank_nccl(tmp_path):
    """An NCCL process group of this process alone: CountAndVote takes its several-process
    path (device tensors, the vote read a step later), with a sum over one rank."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, device_id=device)
    yield device
    dist.destroy_process_group()


def gpu_work(device: torch.device, milliseconds: float):
    """A function that queues about `milliseconds` of GPU work (bf16 matmuls) without a host
    wait, calibrated here; and the GPU time one call of it takes, measured."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    a @ a  # cuBLAS's first call sets it up: not part of the calibration
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ a
    end.record()
    end.synchronize()
    repeats = max(1, round(milliseconds / (start.elapsed_time(end) / 10)))

    def work():
        for _ in range(repeats):
            a @ a
    start.record()
    work()
    end.record()
    end.synchronize()
    return work, start.elapsed_time(end) / 1000


def test_stop_vote_under_nccl_answers_a_step_later_at_little_cost(one_rank_nccl):
    device = one_rank_nccl
    step, step_seconds = gpu_work(device, milliseconds=20)

    # Asked to stop at step 3: the answer comes at step 4, and every step before it gets its
    # count summed on the device (one rank: its own).
    count_and_vote, answers, counts = CountAndVote(device), [], []
    for i in range(6):
        stop, count = count_and_vote(i == 3, torch.tensor(10 + i))
        answers.append(stop)
        if stop:
            break
        assert count.device == device
        counts.append(count)
        step()
    count_and_vote.close()
    torch.cuda.synchronize()
    assert answers == [False] * 4 + [True]
    assert [int(c) for c in counts] == [10, 11, 12, 13]

    # 20 GPU-bound steps with a vote each against 20 without: the votes must not leave the
    # GPU idle. Each call waits for the previous step's vote, which the GPU passes before
    # the previous step's compute, so the host stays one step ahead and the queue full.
    def run(with_vote: bool) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        count_and_vote = CountAndVote(device)
        for _ in range(20):
            if with_vote:
                count_and_vote(False, torch.tensor(1))
            step()
        count_and_vote.close()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    run(True), run(False)  # warm-up: NCCL's first all-reduce, pinned buffers
    with_vote = min(run(True) for _ in range(3))
    without = min(run(False) for _ in range(3))
    per_call = (with_vote - without) / 20
    print(f"RESULT stop vote under NCCL (1 rank): {per_call * 1e3:.3f} ms a call over 20 "
          f"steps of {step_seconds * 1e3:.1f} ms ({with_vote:.3f} s with, {without:.3f} s "
          f"without)")
    assert per_call < 0.1 * step_seconds


# ---------------------------------------------------------------------------------------------
# the prefetch thread on the run's device

def test_prefetch_thread_works_on_the_runs_device():
    # What the CPU test (tests/test_batches.py) cannot: pinning in the thread on a real
    # device, the thread's current device, and batches equal to those made in place.
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    seen = []

    def recording_mask(input_ids, indices, **kwargs):
        seen.append(torch.cuda.current_device())
        return toy_mask(input_ids, indices, **kwargs)

    layout = BatchLayout(num_blocks=40, batch_size=4, grad_accum=2, seed=1)
    blocks = toy_blocks()
    with Prefetcher(blocks, layout, recording_mask, range(4), device, ahead=2) as batches:
        for step in range(4):
            batch = next(batches)
            inputs, labels = step_batch(blocks, layout, toy_mask, step, device)
            assert batch.inputs.device == device and torch.equal(batch.inputs, inputs)
            assert torch.equal(batch.labels, labels)
    assert seen == [device.index] * 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: the context that "
                    "must not open is the one on GPU 0 while the run uses GPU 1")
def test_prefetch_thread_opens_no_context_on_gpu_0():
    # A fresh process that uses GPU 1 only, as rank 1 of two would: after batches prepared
    # and pinned by the thread, GPU 0 must have no CUDA context (a few hundred MB).
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        import torch
        from minibert.batches import BatchLayout, Prefetcher
        from test_batches import toy_blocks, toy_mask
        device = torch.device("cuda", 1)
        torch.cuda.set_device(device)
        layout = BatchLayout(num_blocks=40, batch_size=4, grad_accum=2)
        with Prefetcher(toy_blocks(), layout, toy_mask, range(6), device, ahead=2) as batches:
            for _ in range(6):
                next(batches)
        torch.cuda.synchronize(device)
        print(torch._C._cuda_hasPrimaryContext(0), torch._C._cuda_hasPrimaryContext(1))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True"]


# ---------------------------------------------------------------------------------------------
# the compiled fixed-shape head


@pytest.fixture
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("seq", [128, 512])
def test_compiled_fixed_shape_head_equals_the_eager_boolean_path(fresh_compiler, seq):
    # On a GPU inductor turns the stable argsort of masked_logits into a Triton sort (the CPU
    # falls back to aten): its loss and gradients against the eager boolean gather, in fp32.
    # Rows hold different numbers of targets, so the fixed (batch, k) gather fills some.
    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=512,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(config).cuda().train()
    batch = 8
    ids = torch.randint(5, config.vocab_size, (batch, seq), device="cuda")
    chosen = torch.rand(batch, seq, device="cuda") < torch.linspace(0.1, 0.2, batch,
                                                                    device="cuda")[:, None]
    labels = torch.where(chosen, ids, -100)
    per_row = chosen.sum(dim=1).cpu()
    assert len(set(per_row.tolist())) > 1
    k = int(per_row.max())

    def loss_and_grads(forward, **kwargs):
        model.zero_grad(set_to_none=True)
        loss = forward(ids, labels=labels, reduction="sum", **kwargs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model), max_targets=k)
    difference = abs(compiled_loss.item() - eager_loss.item()) / abs(eager_loss.item())
    worst = max(((compiled_grads[n] - g).abs().max() / g.abs().max()).item()
                for n, g in eager_grads.items())
    print(f"RESULT compiled head seq {seq}: loss {compiled_loss.item():.6f} vs eager "
          f"{eager_loss.item():.6f} (relative {difference:.2e}); worst gradient difference "
          f"{worst:.2e} of its largest entry")
    # fp32 sums of a few hundred targets and of 8 x seq positions, in another order.
    assert difference < 1e-5
    for name, gradient in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], gradient, rtol=1e-4,
                                   atol=1e-5 * gradient.abs().max().item(), msg=name)


# ---------------------------------------------------------------------------------------------
# two processes on one GPU (gloo)


def test_two_processes_sharing_one_gpu_through_gloo_equal_one_process(make_config):
    two = make_config("cuda-two-processes", device="cuda", dist_backend="gloo", batch_size=2,
                      eval_every=4)
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2", "train.py", *config_flags(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    train(make_config("cuda-one-process", device="cuda", batch_size=4, eval_every=4),
          environ={})
    runs = {name: read_metrics(two.out_dir.replace("cuda-two-processes", name))
            for name in ("cuda-two-processes", "cuda-one-process")}
    for key in ("train_loss", "eval_loss", "grad_norm"):
        difference = max_difference(by_step(runs["cuda-two-processes"], key),
                                    by_step(runs["cuda-one-process"], key))
        print(f"RESULT max {key} difference, 2 processes on one GPU (gloo) vs 1: "
              f"{difference:.3g}")
        assert difference < 1e-4


def recompiles_per_rank(log_dir: Path) -> dict[int, int]:
    """How many times dynamo recompiled in each rank of a torchrun launched with
    TORCH_LOGS=recompiles --log-dir LOG_DIR --redirects 3 (one stderr.log per local rank)."""
    counts = {}
    for path in log_dir.rglob("stderr.log"):
        counts[int(path.parent.name)] = len(re.findall(r"Recompiling function",
                                                       path.read_text(errors="replace")))
    return counts


def compiled_whole_word_two_ranks(make_config, tmp_path, device: str) -> tuple[dict, list]:
    """30 steps of 2 ranks (gloo), compiled, whole-word masks: recompiles per rank, metrics."""
    config = make_config("compiled-wwm-two", device=device, dist_backend="gloo",
                         compile=True, whole_word_mask=True, max_seq_length=64, batch_size=2,
                         max_steps=30, log_every=10, eval_every=0, dropout=0.1)
    log_dir = tmp_path / "torchrun-logs"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "--log-dir", str(log_dir), "--redirects",
                             "3", "train.py", *config_flags(config)],
                            cwd=REPO, env={**ENV, "TORCH_LOGS": "recompiles"},
                            capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in log_dir.rglob("*.log"))
    assert result.returncode == 0, (result.stderr[-2000:], logs)
    return recompiles_per_rank(log_dir), read_metrics(config.out_dir)


def test_compiled_whole_word_two_ranks_recompile_at_most_once(make_config, tmp_path):
    recompiles, records = compiled_whole_word_two_ranks(make_config, tmp_path, "cuda")
    losses = by_step(records, "train_loss")
    print(f"RESULT compiled whole-word run, 2 ranks (gloo), 30 steps: recompiles per rank "
          f"{recompiles}, train loss at step 30 {losses.get(30)}")
    assert sorted(recompiles) == [0, 1] and max(recompiles.values()) <= 1
    assert sorted(losses) == [10, 20, 30] and math.isfinite(losses[30])


# ---------------------------------------------------------------------------------------------
# a SIGTERM ends a long run within seconds


def sigterm_during_a_long_run(make_config, device: str) -> tuple[int, float, int]:
    """train.py for 20,000 steps of 128 x 64 whole-word masks (minutes of masking left for a
    prefetch thread that would not stop), SIGTERM once a step is logged: (exit status,
    seconds from the signal to the exit, the step it stopped at)."""
    config = make_config("sigterm", device=device, data=str(CORPUS), whole_word_mask=True,
                         max_seq_length=64, batch_size=128, max_steps=20000, log_every=1,
                         eval_every=0, save_every=0)
    process = subprocess.Popen([sys.executable, "train.py", *config_flags(config)], cwd=REPO,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    metrics = Path(config.out_dir) / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and "train_loss" in metrics.read_text()):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no step logged within 240 s"
            time.sleep(0.2)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=600)
        seconds = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    steps = by_step([json.loads(line) for line in metrics.read_text().splitlines()],
                    "train_loss")
    return status, seconds, max(steps)


def test_sigterm_ends_a_long_run_within_seconds(make_config):
    status, seconds, step = sigterm_during_a_long_run(make_config, "cuda")
    print(f"RESULT SIGTERM during a 20,000-step run: exit {status} after {seconds:.1f} s "
          f"(stopped at step {step})")
    assert status == 128 + signal.SIGTERM
    assert seconds < 20
