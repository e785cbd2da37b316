"""How the weights are updated: one optimizer step over a rank's micro-batches, AdamW with
weight decay on the matrices only, and the linear warmup-then-decay learning-rate schedule
(also when a resumed run changes it).

    optimizer, scheduler = make_optimizer(model, config, warmup_steps=60, total_steps=1000)
    step_nll, grad_norm = optimizer_step(trainee, batch, global_count)   # both on the device

Why the loss is divided by the step's masked-token count. The quantity minimised is the
mean cross-entropy over all masked tokens of the optimizer step, across micro-batches and
ranks: sum of NLL / N. Each micro-batch contributes its summed NLL divided by the global N
(all-reduced before the first forward); averaging per-micro-batch means instead would weight
a token by how few masked tokens its micro-batch happened to have. DDP averages gradients over
the world_size ranks, so each rank multiplies its loss by world_size to turn that average back
into the sum. The gradient is then the single-process large-batch gradient, up to rounding.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed
from .batches import StepBatch
from .errors import MinibertError
from .model import BertForMaskedLM
from .precision import autocast, describe_device
from .train_config import TrainConfig
from .train_state import rng_state, set_rng_state


@dataclass
class Trainee:
    """The model and everything that updates it."""

    model: BertForMaskedLM  # the plain module: evaluation and saving use it
    ddp_model: torch.nn.Module  # the same module, wrapped in DDP when there are several ranks
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    start_step: int  # optimizer steps already done (0, or the resumed checkpoint's step)
    precision: str  # fp32|fp16|bf16: the autocast of the forward passes
    world_size: int  # processes that average their gradients (DDP)
    max_grad_norm: float  # clip the global gradient norm to this (0: no clipping)
    # ddp_model is torch.compile'd and has not run yet: its first step compiles it, and falls
    # back to the uncompiled module if compiling fails (first_compiled_step).
    compile_pending: bool = False


def optimizer_step(trainee: Trainee, batch: StepBatch,
                   global_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's micro-batches, then one AdamW update.

    Returns (this rank's summed NLL over the step, gradient norm before clipping), both still
    on the device: reading them would make the host wait for the GPU (the loop does it only
    when it writes a log line)."""
    if trainee.compile_pending:
        return first_compiled_step(trainee, batch, global_count)
    ddp_model, scaler = trainee.ddp_model, trainee.scaler
    device = trainee.model.word_embeddings.device
    ddp_model.train()
    step_nll = torch.zeros((), dtype=torch.float64, device=device)
    grad_accum = len(batch.inputs)
    for micro in range(grad_accum):
        last_micro = micro == grad_accum - 1
        with distributed.no_sync(ddp_model, skip=not last_micro):
            with autocast(device, trainee.precision):
                # Training blocks are full (no padding): no attention mask is needed. The
                # head runs at a fixed (batch, max_targets) gather of the masked positions:
                # no data-dependent shape, so no sync and no graph break (masked_logits).
                nll = ddp_model(batch.inputs[micro], labels=batch.labels[micro],
                                reduction="sum", max_targets=batch.max_targets)
            # The step's mean over all its masked tokens, x world_size to undo DDP's average
            # (see the module docstring). The scaler multiplies by the fp16 loss scale.
            scaler.scale(nll * trainee.world_size / global_count).backward()
        step_nll += nll.detach()
    scaler.unscale_(trainee.optimizer)  # true gradients, so the clip threshold means what it says
    grad_norm = torch.nn.utils.clip_grad_norm_(trainee.model.parameters(),
                                               trainee.max_grad_norm or float("inf"))
    # Skipped when an fp16 gradient overflowed to inf/NaN. Fused AdamW reads the scaler's
    # overflow flag on the device; other optimizers would make the scaler read it on the host.
    scaler.step(trainee.optimizer)
    scaler.update()  # halves the scale after an overflow, doubles it after 2000 clean steps
    trainee.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # A skipped fp16 step makes torch warn that the scheduler stepped without the
        # optimizer; the schedule follows the step count either way, on purpose.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        trainee.scheduler.step()
    return step_nll, grad_norm


def first_compiled_step(trainee: Trainee, batch: StepBatch,
                        global_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step of a compiled model, which is when torch.compile compiles it (forward at
    the first call, backward at the first backward): if that raises, one line names the error
    and the device, and the step runs again on the uncompiled module, as do all later steps.

    Compilers fail on hardware they were not built for (Triton supports compute capability
    8.0 and newer; docs/appendix-operations.md, A.8), and a run that eager mode
    completes should not die of it. The retry starts from the state the failed attempt
    started from: no update happened (the compiled module is only the forward and backward),
    the gradients it may have accumulated are dropped and the RNG state (dropout's) is put
    back, so the run's numbers are those of an uncompiled run. An error that eager mode
    raises too (a bad input, memory) comes out of the retry as itself. In several processes
    each rank decides for itself: ranks on the same GPU model fail alike and fall back
    together (tested in one process only)."""
    trainee.compile_pending = False
    device = trainee.model.word_embeddings.device
    rng_before = rng_state(device)
    try:
        return optimizer_step(trainee, batch, global_count)
    except (MinibertError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - any compiler failure; eager re-raises real ones
        distributed.print0(f"warning: compiling the training step failed on "
                           f"{describe_device(device)} ({error_line(error)}); continuing "
                           f"without compile")
    trainee.optimizer.zero_grad(set_to_none=True)
    set_rng_state(rng_before, device)
    trainee.ddp_model = trainee.ddp_model._orig_mod  # the module torch.compile wrapped
    return optimizer_step(trainee, batch, global_count)


def error_line(error: Exception) -> str:
    """An exception in one line: the chain of wrappers torch.compile puts around a compiler's
    error (BackendCompilerFailed, InductorError hold it as inner_exception), then the first
    line of the innermost one's message."""
    names = [type(error).__name__]
    while isinstance(getattr(error, "inner_exception", None), Exception):
        error = error.inner_exception
        names.append(type(error).__name__)
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{' -> '.join(names)}: {first[:200]}"


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only. Biases and LayerNorm weights (the 1-d parameters) are
    offsets and scales, not feature detectors: shrinking them toward zero only hurts, as in the
    original BERT optimizer, which excluded "bias" and "LayerNorm" by name."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for the update with 0-based index i: rises linearly to 1 over the first
    warmup_steps updates, then falls linearly, reaching 1/(total - warmup) at the last one
    (no update is wasted on a learning rate of exactly 0)."""
    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        return max(0.0, (total_steps - i) / max(1, total_steps - warmup_steps))
    return factor


def make_optimizer(model: torch.nn.Module, config: TrainConfig, *, warmup_steps: int,
                   total_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's parameter groups and its linear schedule, from the config."""
    # fused=True: one kernel updates every parameter (bert-base, 2 CPU cores: 96 ms a step
    # against 336 ms for the per-parameter loop; benchmarks/README.md). GradScaler supports it.
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(warmup_steps, total_steps))
    return optimizer, scheduler


def restore_optimizer(optimizer: torch.optim.AdamW, scheduler: torch.optim.lr_scheduler.LambdaLR,
                      state: dict, config: TrainConfig, *, warmup_steps: int, total_steps: int,
                      step: int) -> str | None:
    """Load a checkpoint's optimizer and scheduler states, then apply this run's lr, weight
    decay and schedule (`step` updates done). Returns a note when the next update's lr differs
    from the one the stopped run would have used (a new lr or warmup, a longer run)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved_lr = optimizer.param_groups[0]["lr"]  # what the stopped run would have used next
    # The optimizer's state brought back the stopped run's lr and weight_decay: set this run's,
    # then recompute the lr of the next update from this run's schedule.
    optimizer.param_groups[0]["weight_decay"] = config.weight_decay  # the decay group
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler stepped before the optimizer": on purpose
        scheduler.step()
    next_lr = optimizer.param_groups[0]["lr"]
    if math.isclose(next_lr, saved_lr, rel_tol=1e-9):
        return None
    return (f"the learning-rate schedule is this run's ({warmup_steps} warmup, linear decay to "
            f"step {total_steps}): step {step + 1} uses lr {next_lr:.3g} where the stopped run "
            f"would have used {saved_lr:.3g}")
