"""The training loop on a GPU: no host-device synchronisation between two log lines, and the
2-process CUDA path (gloo, both processes sharing one GPU) equal to 1 process.

Skipped where torch sees no CUDA device; benchmarks/gpu_session.sh runs them on a GPU machine.
"""

import sys
import warnings

import pytest
import torch

from minibert.trainer import build, fit, setup, train
from test_train import (by_step, cache_dir, config_flags, make_config, max_difference,  # noqa: F401
                        read_metrics, run_cli, tiny_corpus, tiny_model)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch sees none)")


@pytest.mark.parametrize("precision, compiled", [("bf16", False), ("fp16", False),
                                                 ("bf16", True)])
def test_no_host_device_sync_between_log_lines(make_config, precision, compiled):
    # grad_accum 2 exercises no_sync and the count division; fp16 the GradScaler. The sync
    # check is on from the end of step 2 (compiling and first allocations are done) to the
    # end of step 5: steps 3 to 5 whole, batches, vote, counts, forward, backward, AdamW.
    config = make_config(f"sync-{precision}-{compiled}", device="cuda", precision=precision,
                         grad_accum=2, max_steps=6, log_every=6, eval_every=0, dropout=0.1,
                         compile=compiled)
    run = setup(config, environ={})
    trainee = build(config, run)
    scheduler_step, steps_done = trainee.scheduler.step, []

    def step_and_toggle():
        scheduler_step()
        steps_done.append(1)
        if len(steps_done) == 2:
            torch.cuda.set_sync_debug_mode("warn")
        elif len(steps_done) == 5:
            torch.cuda.set_sync_debug_mode("default")

    trainee.scheduler.step = step_and_toggle
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
        print(f"max {key} difference, 2 processes on one GPU (gloo) vs 1: {difference:.3g}")
        assert difference < 1e-4
