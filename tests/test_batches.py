"""Batches prepared ahead are the batches the loop would have made itself: same rows, same
masks, same order, with or without the background thread; the thread stops when the loop
stops early and hands its errors to the loop."""

import threading
import time

import numpy as np
import pytest
import torch

from minibert import batches as batches_module
from minibert.batches import BatchLayout, Prefetcher, prepare_step, step_batch
from minibert.masking import IGNORE_INDEX, mask_batch

SEQ, VOCAB = 16, 50


def toy_mask(input_ids, indices, *, seed, epoch):
    return mask_batch(input_ids, indices, seed=seed, epoch=epoch, mask_token_id=4,
                      special_token_ids=[0, 1, 2, 4], vocab_size=VOCAB)


def toy_blocks(count: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    blocks = rng.integers(5, VOCAB, (count, SEQ), dtype=np.int32)
    blocks[:, 0], blocks[:, -1] = 1, 2  # [CLS] ... [SEP]
    return blocks


LAYOUT = BatchLayout(num_blocks=40, batch_size=3, grad_accum=2, world_size=2, rank=1, seed=7)


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_prefetched_batches_equal_the_batches_made_in_place(ahead):
    blocks, cpu = toy_blocks(), torch.device("cpu")
    steps = range(2, 2 + 2 * LAYOUT.steps_per_epoch)  # into the next epoch: a new order
    with Prefetcher(blocks, LAYOUT, toy_mask, steps, cpu, ahead=ahead) as batches:
        for step in steps:
            batch = next(batches)
            inputs, labels = step_batch(blocks, LAYOUT, toy_mask, step, cpu)
            assert torch.equal(batch.inputs, inputs) and torch.equal(batch.labels, labels)
            per_row = (labels != IGNORE_INDEX).sum(dim=-1)
            assert batch.count.item() == per_row.sum() and batch.max_targets == per_row.max()
        with pytest.raises(StopIteration):
            next(batches)


def test_leaving_early_stops_the_thread():
    with Prefetcher(toy_blocks(), LAYOUT, toy_mask, range(1000), torch.device("cpu"),
                    ahead=2) as batches:
        next(batches)
        thread = batches._thread
    assert not thread.is_alive()


# Closing waits at most for the step in progress and one 0.1 s poll of the full queue.
# Measured: 2-17 ms (30 closes, 2 shared cores, load average 8), against 5.2 s before the
# thread checked for it; 0.5 s leaves room for a loaded CI machine.
CLOSE_SECONDS = 0.5


def test_closing_stops_the_thread_before_its_next_step():
    # Each step sleeps a millisecond, so preparing all 2000 takes over 2 s however fast the
    # machine. Closed after one batch, the thread must stop before its next step: a stop
    # request would otherwise wait for the masking of the whole rest of the run.
    prepared = []

    def slow_mask(input_ids, indices, **kwargs):
        prepared.append(1)
        time.sleep(0.001)
        return toy_mask(input_ids, indices, **kwargs)

    batches = Prefetcher(toy_blocks(), LAYOUT, slow_mask, range(2000), torch.device("cpu"),
                         ahead=2)
    next(batches)
    thread = batches._thread
    started = time.perf_counter()
    batches.close()
    seconds = time.perf_counter() - started
    assert not thread.is_alive()
    # The one taken, two in the queue, one waiting to be put, one being prepared.
    assert len(prepared) <= 5, f"prepared {len(prepared)} steps of 2000 after close"
    assert seconds < CLOSE_SECONDS, f"close() took {seconds:.2f} s"


def test_an_error_in_the_thread_reaches_the_loop_at_its_step():
    def failing_mask(input_ids, indices, **kwargs):
        if kwargs["epoch"] == 1:
            raise ValueError("bad block")
        return toy_mask(input_ids, indices, **kwargs)

    steps = range(LAYOUT.steps_per_epoch + 1)
    with Prefetcher(toy_blocks(), LAYOUT, failing_mask, steps, torch.device("cpu"),
                    ahead=2) as batches:
        for _ in range(LAYOUT.steps_per_epoch):
            next(batches)  # epoch 0 is fine
        with pytest.raises(ValueError, match="bad block"):
            next(batches)


def next_within(batches, seconds: float = 10.0):
    """next(batches) in a helper thread: what it returned or raised, or a failure when it
    blocks (rather than a test that hangs)."""
    outcome = {}

    def call():
        try:
            outcome["batch"] = next(batches)
        except BaseException as error:
            outcome["error"] = error

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(seconds)
    assert not caller.is_alive(), f"next() still blocked after {seconds} s"
    return outcome


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_failed_step_is_raised_at_that_step_and_at_every_later_call(ahead):
    # Step 2 alone fails (its mask call raises once): the error must come at step 2 and
    # again at every later call, never a batch of step 3 in its place, never a call that
    # blocks; also past the last step.
    calls = []

    def mask_failing_once(input_ids, indices, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("bad block")
        return toy_mask(input_ids, indices, **kwargs)

    with Prefetcher(toy_blocks(), LAYOUT, mask_failing_once, range(5), torch.device("cpu"),
                    ahead=ahead) as batches:
        for _ in range(2):
            assert "batch" in next_within(batches)
        for _ in range(4):
            outcome = next_within(batches)
            assert isinstance(outcome.get("error"), ValueError), outcome


def test_the_thread_selects_the_device_and_one_cpu_thread(monkeypatch):
    # As torch's DataLoader pin-memory thread does: the thread's current CUDA device is 0
    # whatever the loop's, and pinning on the wrong device would open a CUDA context on
    # GPU 0 from rank 1. Here without a GPU: a "cuda:1" device whose pinning and copies are
    # stubbed, and set_device recorded. What only a GPU shows (the context that is not
    # opened on GPU 0) is tests/test_gpu.py::test_prefetch_thread_opens_no_context_on_gpu_0.
    events = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda index: events.append(("set_device", index,
                                                     threading.current_thread().name)))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(batches_module, "to_device", lambda tensor, device: tensor)

    def recording_mask(input_ids, indices, **kwargs):
        events.append(("mask", torch.get_num_threads(), threading.current_thread().name))
        return toy_mask(input_ids, indices, **kwargs)

    threads_before = torch.get_num_threads()
    with Prefetcher(toy_blocks(), LAYOUT, recording_mask, range(3), torch.device("cuda", 1),
                    ahead=2) as batches:
        for _ in range(3):
            next(batches)
    assert events[0] == ("set_device", 1, "minibert-batches")
    assert events[1:] == [("mask", 1, "minibert-batches")] * 3
    assert torch.get_num_threads() == threads_before  # the loop's own threads are untouched


def test_rows_with_different_target_counts_give_the_largest_as_max_targets():
    blocks = toy_blocks()
    blocks[5, 3:] = 0  # mostly [PAD]: one target instead of two
    layout = BatchLayout(num_blocks=40, batch_size=40, grad_accum=1)
    batch = prepare_step(blocks, layout, toy_mask, step=0)
    per_row = (batch.labels != IGNORE_INDEX).sum(dim=-1).flatten()
    assert per_row.min() < per_row.max() == batch.max_targets
