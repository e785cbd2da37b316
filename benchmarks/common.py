"""What every benchmark here shares: the same weights in both implementations, interleaved
timing, peak memory, and the matmul peak that MFU is measured against.

Not a library module: benchmarks are scripts, and transformers is only ever a reference.
"""

from __future__ import annotations

import ctypes
import json
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from minibert.convert import config_to_hf, hf_to_minibert
from minibert.model import BertConfig, BertForMaskedLM

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
IMPLEMENTATIONS = ("minibert", "transformers")


def paired_models(config: BertConfig, seed: int = 0) -> dict[str, torch.nn.Module]:
    """transformers.BertForMaskedLM initialised with `seed`, and minibert holding its weights."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**config_to_hf(config)))
    state, _ = hf_to_minibert(hf.state_dict())
    minibert = BertForMaskedLM(config)
    minibert.load_state_dict(state)
    return {"minibert": minibert, "transformers": hf}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step, the implementations alternating A B, B A, A B, ...

    Other processes share this machine, so its speed drifts from second to second. Running
    the implementations in turn, and reversing the order every repetition, gives both the
    same share of good and bad moments; medians then drop the outliers.
    """
    names = list(steps)
    for i in range(warmup):
        for name in names if i % 2 == 0 else names[::-1]:
            steps[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- peak memory -----------------------------------------------------------------------------

def proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if not match:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def cpu_step_peak_bytes(step: Callable[[], None]) -> int:
    """How far one call of `step` raises this process's resident memory above where it was.

    glibc is first asked to hand freed memory back (malloc_trim), so the baseline is what is
    really live (weights, optimizer state, inputs); the kernel's high-water mark (VmHWM,
    reset through /proc/self/clear_refs) then records the highest resident size the step
    reaches. Call it in a process that holds only one implementation, after warm-up steps.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    step()
    return (proc_status_kib("VmHWM") - before) * 1024


def cpu_tensor_peak_bytes(call: Callable[[], object]) -> int:
    """The most bytes of tensors alive at once during `call`, above those alive when it starts.

    Exact where resident size is coarse (pages, malloc's own caching), but it sees tensors
    only: not Python objects, not the buffers of the tokenizer or of BLAS. It reads the
    profiler's memory timeline, deprecated for CUDA in favour of memory snapshots, which do
    not exist for the CPU.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as profiler:
        call()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        timeline = Path(folder) / "timeline.json"
        profiler.export_memory_timeline(str(timeline), device="cpu")
        _, sizes = json.loads(timeline.read_text())  # bytes by category, at each event
    totals = [sum(categories) for categories in sizes]
    return max(totals) - totals[0] if totals else 0


def cuda_step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """How many bytes of tensors one call of `step` holds at its peak above what was live."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# --- MFU -------------------------------------------------------------------------------------

class MatmulProbe:
    """A square matmul to time again and again: its best time gives the practical peak FLOP/s
    of a CPU, which no table lists. Timed between the training steps (as one more entry of
    `interleaved`), it finds the machine's best moment during the run, not one moment before
    it, when other processes may have been busy."""

    def __init__(self, dtype: torch.dtype, device: torch.device, size: int = 2048):
        self.a = torch.randn(size, size, device=device).to(dtype)
        self.b = torch.randn(size, size, device=device).to(dtype)
        self.flops = 2 * size ** 3

    def __call__(self) -> None:
        self.a @ self.b

    def tflops(self, seconds: list[float]) -> float:
        return self.flops / min(seconds) / 1e12


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2 ** 20:,.0f} MiB"
