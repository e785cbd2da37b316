"""Batches prepared ahead are the batches the loop would have made itself: same rows, same
masks, same order, with or without the background thread; the thread stops when the loop
stops early and hands its errors to the loop."""

import numpy as np
import pytest
import torch

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


def test_rows_with_different_target_counts_give_the_largest_as_max_targets():
    blocks = toy_blocks()
    blocks[5, 3:] = 0  # mostly [PAD]: one target instead of two
    layout = BatchLayout(num_blocks=40, batch_size=40, grad_accum=1)
    batch = prepare_step(blocks, layout, toy_mask, step=0)
    per_row = (batch.labels != IGNORE_INDEX).sum(dim=-1).flatten()
    assert per_row.min() < per_row.max() == batch.max_targets
