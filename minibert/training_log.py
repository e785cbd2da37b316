"""What training reports as it goes: a log line every log_every steps (one line of
metrics.jsonl: the loss over the steps since the previous line, learning rate, gradient norm,
throughput, MFU) and the progress bar, which in a log (output not a terminal) is a plain line
per log step instead: `step 40/80: train loss 4.9876, lr 5.69e-04, 12,700 tokens/s`
(minibert/progress.py says why).

    log = TrainingLog(device, precision, scaler, start_step=0, total_steps=1000,
                      tokens_per_step=256 * 512, world_size=2, flops_per_token=...)
    for every optimizer step:
        log.add(step_nll, global_count, started, grad_norm)  # device sums: no host wait
        if step % log_every == 0:
            record = log.line(step, lr, grad_norm)      # the host waits for the GPU here only
    log.close()

The window. Between two log lines the steps' summed NLL (this rank's) and masked-token count
(all ranks') are added up in tensors on the device, so that a step never makes the host wait
for the GPU. A log line all-reduces the NLL and divides by the count: the exact loss over every
masked token of every rank in the window, never a mean of per-step means. Its "steps" says how
many optimizer steps it covers: log_every, fewer on the first line after a resume and on an
evaluation line between two log steps. The window also sums the steps' gradient norms, so that
a save between two lines can tell whether every loss and norm since the last one is finite
(window_is_finite).

Throughput counts the seconds of training steps only, from the start of each step to its end,
and at a log step to the moment the loss has been read (on a GPU that wait is when the queued
work of the window gets done): evaluating and saving are not training. MFU is the throughput
of one process in model FLOPs (minibert/flops.py) over the device's peak, when the peak is
known (a known GPU, or the run's peak_tflops setting).
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .distributed import all_reduce_sum, is_main, print0
from .flops import mfu, peak_tflops as known_peak_tflops
from .progress import interactive


class TrainingLog:
    """The steps since the last log line, the record they become, and the progress bar (or,
    in a log, the line that stands for it)."""

    def __init__(self, device: torch.device, precision: str, scaler: torch.amp.GradScaler, *,
                 start_step: int, total_steps: int, tokens_per_step: int, world_size: int,
                 flops_per_token: float, peak_tflops: float | None = None):
        self.scaler = scaler  # its loss scale goes on every line when it is enabled (fp16)
        self.tokens_per_step = tokens_per_step  # global batch x sequence length
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        if peak_tflops is None and device.type == "cuda":
            peak_tflops = known_peak_tflops(torch.cuda.get_device_name(device), precision)
        self.peak_tflops = peak_tflops  # per device; None: MFU is not reported
        # The window: this rank's summed NLL, the masked tokens of all ranks, on the device.
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        # Norms are >= 0: their sum is finite exactly when each one is (no cancellation).
        self.grad_norms = torch.zeros((), dtype=torch.float64, device=device)
        self.steps, self.seconds = 0, 0.0
        self._step_end = 0.0  # when the last step added ended
        self.total_steps = total_steps
        # Rank 0 reports: a bar on a terminal; in a file or a pipe a whole line per log step,
        # so that the evaluation lines printed between them stay lines of their own.
        self.plain_lines = is_main() and not interactive()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step",
                        disable=not is_main() or self.plain_lines, dynamic_ncols=True)

    def add(self, step_nll: torch.Tensor, global_count: torch.Tensor, started: float,
            grad_norm: torch.Tensor) -> None:
        """One optimizer step done: its summed NLL (this rank), masked-token count (all ranks)
        and gradient norm join the window without a host wait; it took from `started`
        (perf_counter) until now."""
        self.nll += step_nll
        self.count += global_count
        self.grad_norms += grad_norm
        self.steps += 1
        self._step_end = time.perf_counter()
        self.seconds += self._step_end - started
        self.bar.update(1)

    def line(self, step: int, lr: float, grad_norm: torch.Tensor) -> dict:
        """The log line of the window that ends with `step` (the step just added), as the record
        metrics.jsonl gets: step, steps, train_loss, lr (the one that step used), grad_norm,
        tokens_per_s, mfu (when the peak is known), loss_scale (fp16). Reading the loss makes
        the host wait for the device; the wait counts as that step's time. Starts a new window."""
        train_loss = (all_reduce_sum(self.nll) / self.count).item()  # waits for the GPU
        self.seconds += time.perf_counter() - self._step_end
        tokens_per_s = self.steps * self.tokens_per_step / self.seconds
        record = {"step": step, "steps": self.steps, "train_loss": train_loss, "lr": lr,
                  "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s}
        achieved = mfu(tokens_per_s / self.world_size, self.flops_per_token, self.peak_tflops)
        if achieved is not None:
            record["mfu"] = achieved
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
        self.bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
        if self.plain_lines:
            print0(f"step {step}/{self.total_steps}: train loss {train_loss:.4f}, lr {lr:.2e}, "
                   f"{tokens_per_s:,.0f} tokens/s")
        self.nll.zero_()
        self.count.zero_()
        self.grad_norms.zero_()
        self.steps, self.seconds = 0, 0.0
        return record

    def window_is_finite(self) -> bool:
        """Whether every loss and gradient norm since the last line is finite, on every rank.
        Makes the host wait for the device: the loop asks only before a save."""
        bad = (~torch.isfinite(self.nll) | ~torch.isfinite(self.grad_norms)).to(torch.int64)
        return all_reduce_sum(bad).item() == 0

    def close(self) -> None:
        """The bar ends (its last line stays on the terminal)."""
        self.bar.close()
