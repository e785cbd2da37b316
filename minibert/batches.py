"""Which training blocks each optimizer step reads, on which rank, and with which masks.

    layout = BatchLayout(num_blocks=len(blocks), batch_size=8, grad_accum=2, world_size=2,
                         rank=0, seed=0)
    inputs, labels = step_batch(blocks, layout, mask, step=17, device=device)
    # two (grad_accum, batch_size, max_seq_length) tensors on `device`

How a global batch is cut. Every epoch draws a permutation of the training blocks from
(seed, epoch); optimizer step t of the epoch uses the slice [t*G, (t+1)*G) of it, where
G = batch_size * grad_accum * world_size. That slice is split into grad_accum * world_size
micro-batches of batch_size rows; micro-batch m of rank r is piece m * world_size + r. Each
row is masked by (seed, epoch, block index) alone. So an optimizer step sees the same
sequences with the same masks whether it runs as 2 processes x batch b, 1 process x batch 2b,
or 1 process x batch b x grad_accum 2.

Plain values in, tensors out: nothing here knows about the trainer or torch.distributed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class BatchLayout:
    """How the optimizer steps of a run cut the training blocks into this rank's batches."""

    num_blocks: int  # training blocks in all
    batch_size: int  # sequences per micro-batch on each process
    grad_accum: int  # micro-batches per optimizer step on each process
    world_size: int = 1  # processes
    rank: int = 0  # this process
    seed: int = 0  # seeds the order of every epoch

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step, over all micro-batches and processes."""
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The final partial global batch of each epoch is dropped: every step then has the
        # same number of sequences, and the step -> data mapping stays a simple slice.
        return self.num_blocks // self.global_batch_size

    def epoch_and_step(self, step: int) -> tuple[int, int]:
        """Optimizer step (0-based, over the whole run) -> (epoch, step within that epoch)."""
        return divmod(step, self.steps_per_epoch)

    def rows(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        """Block indices this rank trains on in one optimizer step: (grad_accum, batch_size)."""
        order = epoch_permutation(self.seed, epoch, self.num_blocks)
        start = step_in_epoch * self.global_batch_size
        rows = order[start:start + self.global_batch_size]  # (global_batch,)
        return rows.reshape(self.grad_accum, self.world_size, self.batch_size)[:, self.rank]


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_blocks: int) -> np.ndarray:
    """The order in which an epoch visits the training blocks, from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def step_batch(blocks: np.ndarray, layout: BatchLayout, mask: Callable, step: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's masked inputs and labels for a whole optimizer step, on its device:
    two (grad_accum, batch_size, max_seq_length) tensors. Masks are made for the whole step
    up front because every micro-batch's loss is divided by the step's masked-token count."""
    epoch, step_in_epoch = layout.epoch_and_step(step)
    rows = layout.rows(epoch, step_in_epoch).reshape(-1)  # (grad_accum * batch,)
    input_ids = torch.from_numpy(blocks[rows]).long()
    inputs, labels = mask(input_ids, rows, seed=layout.seed, epoch=epoch)
    shape = (layout.grad_accum, layout.batch_size, blocks.shape[1])
    return to_device(inputs.view(shape), device), to_device(labels.view(shape), device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch to the device; to a GPU from pinned memory, so the copy runs asynchronously
    while the GPU still works on the previous step."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
