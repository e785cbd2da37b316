"""Every torch.distributed call minibert makes: start, who am I, sum across ranks, stop.

torchrun starts one process per device and tells each its place through environment
variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The script hands those
variables to `launch_from_env`; `init` joins the process group: NCCL between CUDA devices,
gloo between CPU processes (dist_backend "auto"). gloo also works between CUDA processes, and
lets several of them share one GPU, which NCCL refuses: a way to run the N-process CUDA path
on a machine with one GPU. A plain `python train.py` sets none of them and runs as rank 0 of
1 without any process group: every helper below then does the single-process thing (sum over
one rank = the value itself), so one training loop serves 1 process and N processes.

The helpers read the rank from torch.distributed's own state rather than from a global of
ours, so rank-0-only output (`print0`) needs no argument threaded through the code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm

from .errors import MinibertError


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int = 0  # global rank: 0 .. world_size - 1, across all nodes
    local_rank: int = 0  # rank on this node; picks the CUDA device
    world_size: int = 1  # number of processes in all

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_from_env(environ: Mapping[str, str]) -> Launch:
    """Read torchrun's RANK, LOCAL_RANK and WORLD_SIZE from `environ` (the script passes
    os.environ). Missing variables mean a plain single-process launch."""
    try:
        launch = Launch(rank=int(environ.get("RANK", 0)),
                        local_rank=int(environ.get("LOCAL_RANK", 0)),
                        world_size=int(environ.get("WORLD_SIZE", 1)))
    except ValueError as error:
        raise MinibertError(f"bad torchrun environment variable ({error})") from None
    if not 0 <= launch.rank < launch.world_size:
        raise MinibertError(f"RANK={launch.rank} is outside WORLD_SIZE={launch.world_size}")
    return launch


BACKENDS = ("auto", "nccl", "gloo")


def init(launch: Launch, device_type: str, backend: str = "auto") -> torch.device:
    """Join the process group (when there is more than one process) and return this
    process's device: cuda:LOCAL_RANK on GPUs, cpu otherwise.

    backend "auto" is NCCL on GPUs and gloo on CPUs. With "gloo" on GPUs, processes beyond the
    number of GPUs share them (LOCAL_RANK modulo the GPU count)."""
    global _left_a_group
    _left_a_group = False
    if backend not in BACKENDS:
        raise MinibertError(f"dist_backend must be one of {'|'.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise MinibertError("dist_backend nccl needs CUDA devices; use gloo (or auto) on CPUs")
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if launch.local_rank >= count and backend == "nccl":
            raise MinibertError(f"LOCAL_RANK {launch.local_rank} but only {count} CUDA devices "
                                f"are visible (dist_backend gloo lets processes share a GPU)")
        device = torch.device("cuda", launch.local_rank % count)
        torch.cuda.set_device(device)  # NCCL and all_gather_object use the current device
    else:
        device = torch.device("cpu")
    if launch.distributed and not dist.is_initialized():
        # init_method "env://" reads MASTER_ADDR / MASTER_PORT (set by torchrun) itself.
        # The timeout only bounds collectives; data preparation never waits in one (the
        # tokenized-data cache is guarded by a file lock, not a barrier).
        dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size, timeout=timedelta(minutes=30),
                                device_id=device if backend == "nccl" else None)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes files and prints: global rank 0."""
    return rank() == 0


def print0(*values: Any) -> None:
    """print() on rank 0 only. Goes through tqdm so that it does not break a progress bar, and
    is flushed at once: a log file gets it now, in order with what went to stderr."""
    if is_main():
        tqdm.write(" ".join(str(v) for v in values))
        if sys.stdout is not None:
            sys.stdout.flush()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place, and return it (unchanged in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class CountAndVote:
    """The one collective of a training step: the step's masked-token count summed over the
    ranks (every micro-batch's loss is divided by it), and the vote on stopping. Neither makes
    the host wait for the GPU.

    Every rank must stop at the same step, or the others would wait forever in the next
    collective. A vote read at once (all-reduce, then .item()) would make the host wait until
    the GPU has finished all the work queued so far, every step. Instead each step's vote
    travels with its count and is read at the next step, when it is long done (on a GPU: once
    the device has passed it, which is before the previous step's compute). So every rank
    stops one step after the request, at the same step. In one process there is nothing to
    agree on: the request is answered at once, and the count is this process's own.

    Where the sum runs depends on the backend. NCCL reduces device tensors only: vote and
    count go to the GPU together (one copy, one all-reduce queued on the stream), the count
    stays there for the loss, and the vote comes back through a pinned host copy whose CUDA
    event the next step waits on. gloo reduces host tensors, and on CUDA tensors it would
    synchronise a stream, a full host wait: vote and count are summed on the CPU (the host
    waits for the other ranks, not for a GPU), and only the count is copied to the device.
    """

    def __init__(self, device: torch.device):
        self._device = device
        # The last step's summed vote on the host, and the CUDA event after which it is there.
        self._pending: tuple[torch.Tensor, Any] | None = None
        self._stop = False  # once a vote said stop, it stays said

    def __call__(self, requested: bool, count: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        """Cast this step's vote with its masked-token count (this rank's, a () int64 tensor on
        the CPU). Returns (stop, the count summed over the ranks, on the device): stop is True
        when some rank asked at the previous step, and then no count is summed (every rank
        leaves the loop before the collective)."""
        if not dist.is_initialized():
            return requested, _to_device(count, self._device)
        if self._result():
            return True, None
        packed = torch.tensor([int(requested), int(count)])  # (2,) int64: vote, count
        on_device = dist.get_backend() == "nccl"
        if on_device:
            packed = _to_device(packed, self._device)
        work = dist.all_reduce(packed, op=dist.ReduceOp.SUM, async_op=True)
        # NCCL: the current stream waits for the reduction, the host not. gloo: the host
        # waits for the other ranks' counts, which the step needs before its first forward.
        work.wait()
        vote, global_count = packed[:1], packed[1]
        event = None
        if on_device and self._device.type == "cuda":
            host = torch.empty(1, dtype=torch.int64).pin_memory()
            host.copy_(vote, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            vote = host
        if not on_device:
            global_count = _to_device(global_count, self._device)
        self._pending = (vote, event)
        return False, global_count

    def _result(self) -> bool:
        if self._pending is not None:
            vote, event = self._pending
            self._pending = None
            if event is not None:
                event.synchronize()  # waits only until the GPU passed the vote, not the queue
            self._stop = self._stop or int(vote[0]) > 0
        return self._stop

    def close(self) -> None:
        """Wait for a vote still in flight (every rank started it, so none is left hanging)."""
        self._result()


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto `device`; to a GPU through pinned memory, asynchronously."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def all_gather_object(value: Any) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] on every rank ([value] in one process)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when there are several processes.

    DDP broadcasts rank 0's weights at construction, then averages the gradients across ranks
    during backward, overlapping the all-reduce with the rest of the backward pass."""
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() (backward without the gradient all-reduce) when `skip`, else nothing.

    With gradient accumulation only the last micro-batch of an optimizer step needs the
    all-reduce: the gradients of the earlier ones simply accumulate locally until then."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def cleanup() -> None:
    """Leave the process group (a no-op when none was joined)."""
    global _left_a_group
    if dist.is_initialized():
        dist.destroy_process_group()
        _left_a_group = True


_left_a_group = False  # cleanup() left a process group since init() was last called


def exit_process(status: int) -> NoReturn:
    """End the process with `status`; after training in a process group, without the
    interpreter's teardown.

    DistributedDataParallel keeps its process group alive past destroy_process_group (torch
    2.13: 10 references to it are never released, and gloo's worker threads keep running), and
    tearing the interpreter down around those threads can abort with "terminate called
    without an active exception" (status -6, which torchrun reports as a failed run, after the
    run has written everything): 8 of 40 exits of a plain two-process torch script, 1 of 30
    two-process runs of train.py. So a process that left a group ends with os._exit once
    stdout and stderr are flushed: by then every file minibert writes is complete, closed and
    renamed into place (safe_write.py), and torch's compile workers leave when their parent
    does."""
    if not _left_a_group:
        sys.exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
