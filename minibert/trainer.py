"""Masked-LM training of BERT: setup -> build -> fit -> evaluate, for 1 process or N.

    train(config, os.environ)     # what train.py calls; the four steps below in order

setup     joins the process group (when torchrun started us), picks device and precision, reads
          the checkpoint, the tokenizer and the tokenized corpus.
build     the model on its device (wrapped in DistributedDataParallel when there are several
          processes), AdamW, the learning-rate schedule, the fp16 GradScaler; restores a
          resume checkpoint.
fit       the loop: one optimizer step = grad_accum micro-batches on every process; logs,
          evaluates, saves, stops cleanly on SIGTERM / Ctrl-C.
evaluate  exact masked-LM loss, perplexity and accuracy on the validation blocks
          (minibert/evaluate.py, also a command of its own).

How a global batch is cut across steps, micro-batches and ranks: minibert/batches.py.

Why the loss is divided by the step's masked-token count. The quantity minimised is the
mean cross-entropy over all masked tokens of the optimizer step, across micro-batches and
ranks: sum of NLL / N. Each micro-batch contributes its summed NLL divided by the global N
(all-reduced before the first forward); averaging per-micro-batch means instead would weight
a token by how few masked tokens its micro-batch happened to have. DDP averages gradients over
the world_size ranks, so each rank multiplies its loss by world_size to turn that average back
into the sum. The gradient is then the single-process large-batch gradient, up to rounding.
"""

from __future__ import annotations

import functools
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .batches import BatchLayout, Prefetcher, StepBatch
from .checkpoint import positions_held, random_init, read_checkpoint, save_pretrained
from .data import check_splits, load_blocks
from .distributed import StopVote, all_reduce_sum, is_main, print0
from .errors import MinibertError
from .evaluate import evaluate
from .flops import mfu, peak_tflops, training_flops_per_token
from .masking import make_masker
from .model import BertForMaskedLM
from .precision import autocast, precision_warning, resolve_device, resolve_precision
from .safe_write import remove_folder, tidy
from .stopping import StopRequest
from .tokenizer import load_tokenizer
from .train_config import TrainConfig
from .train_state import (DataPosition, MetricsFile, compare_configs, load_training_state, prune,
                          resolve_resume, rng_state, save_training_state, set_rng_state,
                          step_checkpoints)

# ---------------------------------------------------------------------------------------------
# setup


@dataclass
class Run:
    """What setup() prepared: this process's place, device and numerics, model and data."""

    config: TrainConfig
    launch: distributed.Launch
    device: torch.device
    precision: str  # fp32|fp16|bf16, "auto" resolved
    out_dir: Path
    model: BertForMaskedLM  # as read, on the CPU
    model_folder: Path  # the folder it was read from: vocab.txt comes from here
    resume_from: Path | None  # a step-N checkpoint folder, or None for a fresh run
    train_blocks: np.ndarray  # (num_blocks, max_seq_length) token ids, memory-mapped
    eval_blocks: np.ndarray  # (num_eval_blocks, max_seq_length)
    mask: Callable  # mask_batch with this tokenizer's special ids filled in (make_masker)

    @property
    def layout(self) -> BatchLayout:
        """Which blocks each step of this rank reads (minibert/batches.py)."""
        return BatchLayout(len(self.train_blocks), self.config.batch_size,
                           self.config.grad_accum, self.launch.world_size, self.launch.rank,
                           self.config.seed)

    @property
    def global_batch_size(self) -> int:
        return self.layout.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.config.max_steps or self.config.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        if self.config.warmup_steps is not None:
            return min(self.config.warmup_steps, self.total_steps)
        return round(self.config.warmup_ratio * self.total_steps)


def setup(config: TrainConfig, environ: Mapping[str, str]) -> Run:
    """Join the process group, choose device and precision, read model, tokenizer and data."""
    launch = distributed.launch_from_env(environ)
    device = distributed.init(launch, resolve_device(config.device), config.dist_backend)
    precision = resolve_precision(config.precision, device)
    if warning := precision_warning(precision, device):
        print0(warning)

    out_dir = Path(config.out_dir)
    if is_main():  # finish or undo a checkpoint write that a kill interrupted, before looking
        tidy(out_dir / "checkpoints")
    distributed.barrier()
    resume_from = resolve_resume(config.resume, out_dir) if config.resume else None
    if resume_from is None and step_checkpoints(out_dir) and not config.overwrite:
        raise MinibertError(f"{out_dir} holds checkpoints of an earlier run: pass --resume to "
                            f"continue it, --overwrite to start afresh, or another --out_dir")

    check_splits(config.data, ("train", "validation"))  # both, before tokenizing either

    # Resuming reads the weights from the checkpoint, whose folder also holds vocab.txt.
    if resume_from is None and config.init == "random":
        model, model_folder, notices = random_init(config.model, seed=config.seed,
                                                   overrides=config.model_config)
    else:
        model, model_folder, notices = read_checkpoint(resume_from / "model" if resume_from
                                                       else config.model, seed=config.seed)
    for notice in notices:
        print0(f"note: {notice}")
    if config.max_seq_length > model.config.max_sequence_length:
        raise MinibertError(f"max_seq_length {config.max_seq_length} exceeds the model's "
                            f"{positions_held(model.config)}")
    tokenizer = load_tokenizer(model_folder)

    # Every rank calls load_blocks; its file lock lets one of them tokenize, the others wait.
    read = functools.partial(load_blocks, config.data, tokenizer=tokenizer,
                             max_seq_length=config.max_seq_length,
                             cache_dir=Path(config.cache_dir).expanduser(),
                             join_wikitext_artifacts=config.join_wikitext_artifacts,
                             show_progress=is_main())
    train_blocks, eval_blocks = read(split="train"), read(split="validation")
    eval_blocks = eval_blocks[:config.eval_max_blocks]  # [:None] keeps them all
    mask = make_masker(tokenizer, vocab_size=model.config.vocab_size,
                       mlm_probability=config.mlm_probability,
                       whole_word_mask=config.whole_word_mask)
    run = Run(config, launch, device, precision, out_dir, model, model_folder, resume_from,
              train_blocks, eval_blocks, mask)
    if run.steps_per_epoch == 0:
        raise MinibertError(f"the training split has {len(train_blocks)} blocks, fewer than one "
                            f"global batch of {run.global_batch_size} (batch_size x grad_accum "
                            f"x processes)")
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and config.overwrite:
            remove_folder(out_dir / "checkpoints")
    return run


# ---------------------------------------------------------------------------------------------
# build


@dataclass
class Trainee:
    """The model and everything that updates it."""

    model: BertForMaskedLM  # the plain module: evaluation and saving use it
    ddp_model: torch.nn.Module  # the same module, wrapped in DDP when there are several ranks
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    start_step: int  # optimizer steps already done (0, or the resumed checkpoint's step)


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


def build(config: TrainConfig, run: Run) -> Trainee:
    """Model on its device (in DDP across ranks), AdamW, schedule, GradScaler; resume if asked."""
    model = run.model
    if config.dropout is not None:
        # Rebuild with the new dropout through the model's own constructor, then copy weights.
        dropout_config = replace(model.config, hidden_dropout_prob=config.dropout,
                                 attention_probs_dropout_prob=config.dropout)
        state = model.state_dict()
        model = BertForMaskedLM(dropout_config, add_pooling_layer=model.bert.pooler is not None)
        model.load_state_dict(state)
    model = model.to(run.device)
    ddp_model = distributed.wrap_model(model, run.device)
    if config.compile:
        # Compiled after the DDP wrap, so that the compiler sees DDP's gradient buckets (it
        # splits the graph at them, to overlap the all-reduce with the backward). With the
        # fixed-shape head (optimizer_step passes max_targets) the training forward is one
        # graph without a break. Evaluation and saving keep using the plain module.
        ddp_model = torch.compile(ddp_model)

    # fused=True: one kernel updates every parameter (bert-base, 2 CPU cores: 96 ms a step
    # against 336 ms for the per-parameter loop; benchmarks/README.md). GradScaler supports it.
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(run.warmup_steps, run.total_steps))
    # Loss scaling exists for fp16 only: its 5-bit exponent flushes small gradients to zero
    # unless the loss is scaled up first; bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16")

    # Dropout is the only user of torch's RNG; each rank gets its own stream so that ranks do
    # not drop the same units. (Data order and masks have their own seeded generators.)
    torch.manual_seed(int(np.random.SeedSequence([config.seed, run.launch.rank])
                          .generate_state(1, np.uint64)[0]))
    start_step = 0
    if run.resume_from is not None:
        start_step = restore(run, optimizer, scheduler, scaler)
    return Trainee(model, ddp_model, optimizer, scheduler, scaler, start_step)


def restore(run: Run, optimizer, scheduler, scaler) -> int:
    """Load optimizer, scheduler, GradScaler and this rank's RNG state; return the step.

    The run's settings are compared with the checkpoint's first (train_state.compare_configs):
    one that changes what the steps compute is refused, an accepted change is reported. A new
    lr, warmup or weight_decay is applied, and the learning rate always follows this run's
    schedule: extending max_steps reshapes it, and one line says how the lr moves."""
    state = load_training_state(run.resume_from)
    notes = compare_configs(state["config"], run.config)
    position: DataPosition = state["position"]
    if (position.global_batch_size, position.num_train_blocks) != (
            run.global_batch_size, len(run.train_blocks)):
        raise MinibertError(
            f"{run.resume_from}: saved with a global batch of {position.global_batch_size} over "
            f"{position.num_train_blocks} blocks, this run has {run.global_batch_size} over "
            f"{len(run.train_blocks)}; resume with the same data, batch_size x grad_accum x "
            f"processes")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved_lr = optimizer.param_groups[0]["lr"]  # what the stopped run would have used next
    # The optimizer's state brought back the stopped run's lr and weight_decay: set this run's,
    # then recompute the lr of the next update from this run's schedule.
    optimizer.param_groups[0]["weight_decay"] = run.config.weight_decay  # the decay group
    scheduler.base_lrs = [run.config.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = run.config.lr
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler stepped before the optimizer": on purpose
        scheduler.step()
    next_lr = optimizer.param_groups[0]["lr"]
    if not math.isclose(next_lr, saved_lr, rel_tol=1e-9):
        notes.append(f"the learning-rate schedule is this run's ({run.warmup_steps} warmup, "
                     f"linear decay to step {run.total_steps}): step {position.step + 1} uses "
                     f"lr {next_lr:.3g} where the stopped run would have used {saved_lr:.3g}")
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    rng_states = state["rng_states"]
    if len(rng_states) == run.launch.world_size:
        set_rng_state(rng_states[run.launch.rank], run.device)
    else:
        notes.append(f"the checkpoint holds RNG states of {len(rng_states)} processes, this run "
                     f"has {run.launch.world_size}: dropout draws will differ from the original run")
    for note in notes:
        print0(f"note: {note}")
    print0(f"resumed from {run.resume_from} at step {position.step}")
    return position.step


# ---------------------------------------------------------------------------------------------
# fit


def optimizer_step(run: Run, trainee: Trainee, batch: StepBatch,
                   global_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's micro-batches, then one AdamW update.

    Returns (this rank's summed NLL over the step, gradient norm before clipping), both still
    on the device: reading them would make the host wait for the GPU (the loop does it only
    when it writes a log line)."""
    config, ddp_model, scaler = run.config, trainee.ddp_model, trainee.scaler
    ddp_model.train()
    step_nll = torch.zeros((), dtype=torch.float64, device=run.device)
    for micro in range(config.grad_accum):
        last_micro = micro == config.grad_accum - 1
        with distributed.no_sync(ddp_model, skip=not last_micro):
            with autocast(run.device, run.precision):
                # Training blocks are full (no padding): no attention mask is needed. The
                # head runs at a fixed (batch, max_targets) gather of the masked positions:
                # no data-dependent shape, so no sync and no graph break (masked_logits).
                nll = ddp_model(batch.inputs[micro], labels=batch.labels[micro],
                                reduction="sum", max_targets=batch.max_targets)
            # The step's mean over all its masked tokens, x world_size to undo DDP's average
            # (see the module docstring). The scaler multiplies by the fp16 loss scale.
            scaler.scale(nll * run.launch.world_size / global_count).backward()
        step_nll += nll.detach()
    scaler.unscale_(trainee.optimizer)  # true gradients, so the clip threshold means what it says
    grad_norm = torch.nn.utils.clip_grad_norm_(trainee.model.parameters(),
                                               config.max_grad_norm or float("inf"))
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


def save_checkpoint(run: Run, trainee: Trainee, step: int) -> None:
    """checkpoints/step-N (rank 0 writes it; every rank hands over its RNG state)."""
    rng_states = distributed.all_gather_object(rng_state(run.device))
    folder = run.out_dir / "checkpoints" / f"step-{step}"
    if is_main():
        epoch, step_in_epoch = run.layout.epoch_and_step(step)
        save_training_state(
            folder, model=trainee.model,
            tokenizer_source=run.model_folder, optimizer=trainee.optimizer,
            scheduler=trainee.scheduler, scaler=trainee.scaler, rng_states=rng_states,
            config=asdict(run.config),
            position=DataPosition(step, epoch, step_in_epoch, run.global_batch_size,
                                  len(run.train_blocks)))
        prune(run.out_dir, run.config.keep_last)  # only now that the new one is on disk
    # Later saves copy vocab.txt from the newest checkpoint: the one this run resumed from,
    # which run.model_folder pointed at, may just have been pruned.
    run.model_folder = folder / "model"


def fit(config: TrainConfig, run: Run, trainee: Trainee) -> dict:
    """Train from trainee.start_step to run.total_steps; returns a summary of the run.

    metrics.jsonl gets a line at step 0 (evaluation only), every log_every steps and at every
    evaluation. Its train_loss is the loss over all masked tokens of all ranks in the steps
    since the previous line: that step's own loss when log_every is 1. Its "steps" says how
    many optimizer steps the line covers (after a resume the first line covers the steps
    since the checkpoint only).

    Between two log lines the loop never makes the host wait for a GPU: the batches come
    from a background thread (batches.Prefetcher), the masked-token counts from the CPU-side
    labels, the stop vote is read one step late (distributed.StopVote), and loss and gradient
    norm stay on the device until a log line reads them."""
    model, scheduler, scaler, device = trainee.model, trainee.scheduler, trainee.scaler, run.device
    world, total_steps, seq_len = run.launch.world_size, run.total_steps, config.max_seq_length
    step = trainee.start_step
    resumed = run.resume_from is not None
    metrics = MetricsFile(run.out_dir / "metrics.jsonl", keep_until_step=step if resumed else None,
                          global_batch_size=run.global_batch_size, max_seq_length=seq_len)

    flops_per_token = training_flops_per_token(model.config, seq_len, config.mlm_probability)
    peak = config.peak_tflops or (peak_tflops(torch.cuda.get_device_name(device), run.precision)
                                  if device.type == "cuda" else None)
    params = sum(p.numel() for p in model.parameters())
    print0(f"{world} process(es) on {device.type}, {run.precision}; model {params / 1e6:.1f} M "
           f"parameters; {len(run.train_blocks)} training blocks of {seq_len} tokens, "
           f"{len(run.eval_blocks)} evaluation blocks; global batch {run.global_batch_size} "
           f"({config.batch_size} x {config.grad_accum} accumulation x {world}); "
           f"{run.steps_per_epoch} steps per epoch, {total_steps} steps, "
           f"{run.warmup_steps} warmup")

    summary: dict = {"start_step": step, "stopped": False, "evals": {}}
    last_saved = step if resumed else None

    def run_eval(record: dict) -> None:
        result = evaluate(model, run.eval_blocks, run.mask, seed=config.eval_seed,
                          batch_size=config.eval_batch_size or config.batch_size,
                          device=device, precision=run.precision)
        result["eval_masking"] = "whole-word" if config.whole_word_mask else "token"
        record.update(result)
        summary["evals"][record["step"]] = result
        print0(f"step {record['step']}: eval loss {result['eval_loss']:.4f}, perplexity "
               f"{result['eval_perplexity']:.2f}, accuracy {result['eval_accuracy']:.4f}")

    def save(step: int) -> None:
        nonlocal last_saved
        save_checkpoint(run, trainee, step)
        last_saved = step

    if not resumed:  # step 0: the pretrained model before any update
        record = {"step": 0}
        run_eval(record)
        metrics.write(record, plot=True)
        if config.init == "random":
            # A fresh model spreads its guesses evenly over the vocabulary: its loss should sit
            # near ln(V). Far above it, the initialisation is off (std too large).
            print0(f"step 0 of a randomly initialised model: eval loss {record['eval_loss']:.4f}"
                   f", ln(vocab size {model.config.vocab_size}) = "
                   f"{math.log(model.config.vocab_size):.4f}")

    # Sums since the last log line: summed NLL of this rank, masked tokens of all ranks.
    window_nll = torch.zeros((), dtype=torch.float64, device=device)
    window_count = torch.zeros((), dtype=torch.int64, device=device)
    window_steps, window_seconds = 0, 0.0  # seconds of training steps only (no eval, no save)
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step",
               disable=not is_main(), dynamic_ncols=True)
    # On a GPU the next steps are masked in a background thread while the device computes;
    # on a CPU that thread would only take cores from the step itself.
    ahead = 2 if device.type == "cuda" else 0
    vote = StopVote(device)
    with StopRequest() as stop, Prefetcher(run.train_blocks, run.layout, run.mask,
                                           range(step, total_steps), device, ahead) as batches:
        while step < total_steps:
            step_start = time.perf_counter()
            # Every rank must stop at the same step; in several processes the vote is read
            # one step after it was cast, so a request made during step t stops after t + 1.
            if vote(stop.requested):
                break
            batch = next(batches)
            # The step's masked tokens over all ranks: every micro-batch's loss is divided by
            # it. Counted on the CPU, summed on the device without the host waiting.
            global_count = all_reduce_sum(batch.count)
            lr = scheduler.get_last_lr()[0]
            step_nll, grad_norm = optimizer_step(run, trainee, batch, global_count)
            step += 1
            window_nll += step_nll
            window_count += global_count
            window_steps += 1
            bar.update(1)

            is_eval = step == total_steps or (config.eval_every and step % config.eval_every == 0)
            if step % config.log_every == 0 or is_eval:
                train_loss = (all_reduce_sum(window_nll) / window_count).item()  # waits for GPU
                window_seconds += time.perf_counter() - step_start
                tokens_per_s = window_steps * run.global_batch_size * seq_len / window_seconds
                record = {"step": step, "steps": window_steps, "train_loss": train_loss,
                          "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s}
                achieved = mfu(tokens_per_s / world, flops_per_token, peak)
                if achieved is not None:
                    record["mfu"] = achieved
                if scaler.is_enabled():
                    record["loss_scale"] = scaler.get_scale()
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
                summary["train_loss"] = train_loss
                if is_eval:
                    run_eval(record)
                metrics.write(record, plot=is_eval)  # loss.png is redrawn at each evaluation
                window_nll.zero_()
                window_count.zero_()
                window_steps, window_seconds = 0, 0.0
            else:
                window_seconds += time.perf_counter() - step_start
            if config.save_every and step % config.save_every == 0:
                save(step)
        vote.close()
        bar.close()
        # Still under StopRequest: a first signal now lets these saves finish, a second one
        # stops at once, and no write leaves anything half-done either way.
        if last_saved != step:
            save(step)
        if step < total_steps:  # left the loop early: a stop was requested
            print0(f"stopped at step {step}; continue with --resume")
            # A rank stopped by another rank's vote got no signal itself: report SIGTERM.
            summary.update(stopped=True, step=step, signal=stop.signum or signal.SIGTERM)
            return summary
        if is_main():
            save_pretrained(model, run.out_dir / "final", tokenizer_source=run.model_folder,
                            overwrite=True)
    if device.type == "cuda":
        print0(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print0(f"wrote {run.out_dir / 'final'} and {run.out_dir / 'metrics.jsonl'}, "
           f"{run.out_dir / 'loss.png'}")
    summary["step"] = step
    return summary


# ---------------------------------------------------------------------------------------------


def train(config: TrainConfig, environ: Mapping[str, str]) -> dict:
    """The whole run: setup -> build -> fit (evaluating as it goes). `environ` holds torchrun's
    variables (the script passes os.environ); returns fit's summary."""
    try:
        run = setup(config, environ)
        trainee = build(config, run)
        return fit(config, run, trainee)
    finally:
        distributed.cleanup()
