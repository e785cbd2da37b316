"""Which training blocks each optimizer step reads, on which rank, and with which masks.

    layout = BatchLayout(num_blocks=len(blocks), batch_size=8, grad_accum=2, world_size=2,
                         rank=0, seed=0)
    inputs, labels = step_batch(blocks, layout, mask, step=17, device=device)
    # two (grad_accum, batch_size, max_seq_length) tensors on `device`

    with Prefetcher(blocks, layout, mask, range(start, total), device, ahead=2) as batches:
        for step in range(start, total):
            batch = next(batches)  # a StepBatch: inputs, labels, count, max_targets
            # inputs and labels on `device`, the count still on the CPU

How a global batch is cut. Every epoch draws a permutation of the training blocks from
(seed, epoch); optimizer step t of the epoch uses the slice [t*G, (t+1)*G) of it, where
G = batch_size * grad_accum * world_size. That slice is split into grad_accum * world_size
micro-batches of batch_size rows; micro-batch m of rank r is piece m * world_size + r. Each
row is masked by (seed, epoch, block index) alone. So an optimizer step sees the same
sequences with the same masks whether it runs as 2 processes x batch b, 1 process x batch 2b,
or 1 process x batch b x grad_accum 2.

Batches prepared ahead. Masking a step's rows takes milliseconds of CPU (5.5 ms for 32 x 512,
18 ms for 256 x 128 on one thread), time in which a GPU would sit idle if the loop did it
between two steps. `Prefetcher` masks, stacks and pins the next steps in a background thread
while the GPU runs the current one. It calls the same `prepare_step` for the same steps in the
same order as the loop would, so the batches are identical with or without it: masks depend on
(seed, epoch, block index) only, never on timing.

Plain values in, tensors out: nothing here knows about the trainer or torch.distributed.
"""

from __future__ import annotations

import functools
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .masking import IGNORE_INDEX


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


@dataclass
class StepBatch:
    """This rank's share of one optimizer step, and what the loop needs to know about it
    without asking the device: the counts are made on the CPU, from the CPU-side labels."""

    inputs: torch.Tensor  # (grad_accum, batch_size, max_seq_length) masked token ids
    labels: torch.Tensor  # (grad_accum, batch_size, max_seq_length), -100 where not a target
    count: torch.Tensor  # () int64 on the CPU: targets in this rank's step (summed by the loop)
    max_targets: int  # the most targets in any row of the step: the model's fixed (batch, k)

    def to(self, device: torch.device) -> "StepBatch":
        """Inputs and labels on `device`. The count stays on the CPU: the loop sums it over
        the ranks from there (distributed.CountAndVote), and only then copies it."""
        return StepBatch(to_device(self.inputs, device), to_device(self.labels, device),
                         self.count, self.max_targets)


def prepare_step(blocks: np.ndarray, layout: BatchLayout, mask: Callable, step: int,
                 pin: bool = False) -> StepBatch:
    """This rank's masked batch for a whole optimizer step, on the CPU (in pinned memory when
    `pin`, ready for an asynchronous copy to a GPU). Masks are made for the whole step up
    front because every micro-batch's loss is divided by the step's masked-token count."""
    epoch, step_in_epoch = layout.epoch_and_step(step)
    rows = layout.rows(epoch, step_in_epoch).reshape(-1)  # (grad_accum * batch,)
    input_ids = torch.from_numpy(blocks[rows]).long()
    inputs, labels = mask(input_ids, rows, seed=layout.seed, epoch=epoch)
    targets_per_row = (labels != IGNORE_INDEX).sum(dim=1)  # (grad_accum * batch,)
    shape = (layout.grad_accum, layout.batch_size, blocks.shape[1])
    batch = StepBatch(inputs.view(shape), labels.view(shape), targets_per_row.sum(),
                      int(targets_per_row.max()))
    if pin:
        batch = StepBatch(batch.inputs.pin_memory(), batch.labels.pin_memory(),
                          batch.count.pin_memory(), batch.max_targets)
    return batch


def step_batch(blocks: np.ndarray, layout: BatchLayout, mask: Callable, step: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's masked inputs and labels for a whole optimizer step, on its device:
    two (grad_accum, batch_size, max_seq_length) tensors (prepare_step, then the copy)."""
    batch = prepare_step(blocks, layout, mask, step, pin=device.type == "cuda").to(device)
    return batch.inputs, batch.labels


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch to the device; to a GPU from pinned memory, so the copy runs asynchronously
    while the GPU still works on the previous step."""
    if device.type == "cuda":
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    return tensor.to(device)


class Prefetcher:
    """The StepBatches of `steps`, in order, each prepared up to `ahead` steps early by a
    background thread; ahead=0 prepares each one when it is asked for, in the caller's thread.

    Use it as a context manager: leaving it (a stop request ends the loop early) stops the
    thread before its next step, so that leaving waits for one step's masking at most, not for
    the rest of the run's. A step that fails to prepare is never skipped: its error is raised
    by the next() that would have returned it, and again by every later call."""

    def __init__(self, blocks: np.ndarray, layout: BatchLayout, mask: Callable, steps: range,
                 device: torch.device, ahead: int = 1):
        self._prepare = functools.partial(prepare_step, blocks, layout, mask,
                                          pin=device.type == "cuda")
        self._device = device
        self._steps = iter(steps)
        self._error: BaseException | None = None  # the failed step's, raised from then on
        self._thread = None
        if ahead > 0:
            self._ready: queue.Queue = queue.Queue(maxsize=ahead)
            self._closed = threading.Event()
            # The caller's CUDA device, for the thread to select (device "cuda" means the
            # current one, which is per thread: read it here, in the caller's thread).
            cuda_index = None
            if device.type == "cuda":
                cuda_index = torch.cuda.current_device() if device.index is None else device.index
            self._thread = threading.Thread(target=self._work, args=(steps, cuda_index),
                                            daemon=True, name="minibert-batches")
            self._thread.start()

    def _work(self, steps: range, cuda_index: int | None) -> None:
        # What torch's DataLoader pin-memory thread does first (torch/utils/data/_utils/
        # pin_memory.py). One intra-op thread (a per-thread setting): masking and pinning
        # must not take the cores of the loop's thread, which feeds the GPU. And the run's
        # device: a new thread's current CUDA device is 0, and pinning can reach the caching
        # host allocator's event queries without a device guard, so rank 1 of two GPUs
        # would open a CUDA context (a few hundred MB) on rank 0's GPU.
        torch.set_num_threads(1)
        try:
            if cuda_index is not None:
                torch.cuda.set_device(cuda_index)
            for step in steps:
                if self._closed.is_set():
                    return  # the loop has left: prepare nothing more
                self._put(self._prepare(step))
        except BaseException as error:  # handed to the loop, which raises it
            self._put(error)

    def _put(self, item) -> None:
        while not self._closed.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> StepBatch:
        if self._error is not None:
            raise self._error
        if self._thread is None:
            step = next(self._steps)
            try:
                batch = self._prepare(step)
            except BaseException as error:
                self._error = error
                raise
            return batch.to(self._device)
        next(self._steps)  # StopIteration after the last step, like the thread
        item = self._ready.get()
        if isinstance(item, BaseException):
            self._error = item  # the thread has ended: nothing more will come
            raise item
        return item.to(self._device)

    def close(self) -> None:
        if self._thread is not None:
            self._closed.set()
            self._thread.join()  # at most the step in progress, and 0.1 s in _put
            self._thread = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
