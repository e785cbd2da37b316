"""Masked-LM training of BERT: setup -> build -> fit -> evaluate, for 1 process or N.

    train(config, os.environ)     # what train.py calls; the four steps below in order

setup     joins the process group (when torchrun started us), picks device and precision, reads
          the checkpoint, the tokenizer and the tokenized corpus.
build     the model on its device (wrapped in DistributedDataParallel when there are several
          processes), AdamW, the learning-rate schedule, the fp16 GradScaler; restores a
          resume checkpoint.
fit       the loop: one optimizer step = grad_accum micro-batches on every process; logs,
          evaluates, saves, stops cleanly on SIGTERM / Ctrl-C, and with exit status 1 when
          the loss diverges.
evaluate  exact masked-LM loss, perplexity and accuracy on the validation blocks
          (minibert/evaluate.py, also a command of its own).

How a global batch is cut across steps, micro-batches and ranks: minibert/batches.py. One
optimizer step, AdamW and the schedule (and why the loss is divided by the step's masked-token
count): minibert/optimizer.py. What a log line holds: minibert/training_log.py. What a resume
restores and decides (going back to an older checkpoint, say): minibert/resume.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from . import distributed
from .batches import BatchLayout, Prefetcher
from .checkpoint import random_init, read_checkpoint, save_pretrained
from .data import check_splits, load_blocks
from .distributed import CountAndVote, is_main, print0
from .errors import MinibertError
from .evaluate import check_block_length, evaluate
from .flops import training_flops_per_token
from .masking import make_masker
from .model import BertForMaskedLM
from .optimizer import Trainee, make_optimizer, optimizer_step
from .plot import plot_runs
from .precision import compile_note, precision_warning, resolve_device, resolve_precision
from .resume import (nothing_to_do, plan_new_line, prepare_out_dir, restore, start_new_line,
                     starting_point)
from .stopping import StopRequest, divergence
from .tokenizer import load_tokenizer
from .train_config import TrainConfig
from .training_log import TrainingLog
from .train_state import (DataPosition, MetricsFile, checkpoint_step, newest_checkpoint, prune,
                          rng_state, save_training_state, tensor_bytes)
from .write_errors import DiskFullError, check_writable

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
    model_folder: Path  # the folder it was read from (its vocab.txt is the tokenizer's)
    resume_from: Path | None  # a step-N checkpoint folder, or None for a fresh run
    train_blocks: np.ndarray  # (num_blocks, max_seq_length) token ids, memory-mapped
    eval_blocks: np.ndarray  # (num_eval_blocks, max_seq_length)
    mask: Callable  # mask_batch with this tokenizer's special ids filled in (make_masker)
    # Where the next save copies vocab.txt from: model_folder, then the newest checkpoint this
    # run saved (the checkpoint it resumed from may have been pruned since).
    tokenizer_source: Path = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer_source = self.model_folder

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
    check_writable(out_dir, "out_dir")  # before any work; created once every check passed
    resume_from = starting_point(config, out_dir)
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
    check_block_length(config.max_seq_length, model)
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
        prepare_out_dir(run)
    return run


# ---------------------------------------------------------------------------------------------
# build


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
        # graph without a break. Evaluation and saving keep using the plain module. The
        # compiler runs at the first step, which falls back to eager if it fails.
        if note := compile_note(run.device):
            print0(note)
        ddp_model = torch.compile(ddp_model)

    optimizer, scheduler = make_optimizer(model, config, warmup_steps=run.warmup_steps,
                                          total_steps=run.total_steps)
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
    return Trainee(model, ddp_model, optimizer, scheduler, scaler, start_step, run.precision,
                   run.launch.world_size, config.max_grad_norm, compile_pending=config.compile)


# ---------------------------------------------------------------------------------------------
# fit


def fit(config: TrainConfig, run: Run, trainee: Trainee) -> dict:
    """Train from trainee.start_step to run.total_steps; returns a summary of the run.

    metrics.jsonl gets a line at step 0 (evaluation only), every log_every steps and at every
    evaluation (minibert/training_log.py says what a line holds); after a resume the lines
    after the checkpoint's step are dropped first (a resume that goes back moves the old line
    aside: resume.py). A loss that is not finite stops the run (stopping.divergence).

    Between two log lines the loop never makes the host wait for a GPU: the batches come
    from a background thread (batches.Prefetcher), the masked-token counts from the CPU-side
    labels, summed with the stop vote, which is read one step late (distributed.CountAndVote),
    and loss and gradient norm stay on the device until a log line reads them."""
    step = trainee.start_step
    resumed = run.resume_from is not None
    if resumed and is_main() and (line := plan_new_line(run.out_dir, run.resume_from, step)):
        print0(start_new_line(line))  # going back: the old line moves aside (resume.py)
    distributed.barrier()  # the other ranks wait for rank 0's moves
    metrics = MetricsFile(run.out_dir / "metrics.jsonl", keep_until_step=step if resumed else None,
                          global_batch_size=run.global_batch_size,
                          max_seq_length=config.max_seq_length)
    print0(describe(run, trainee.model))
    summary: dict = {"start_step": step, "stopped": False, "evals": {}}
    last_saved = step if resumed else None

    def write(record: dict, evaluate_now: bool) -> None:
        if evaluate_now:
            result = run_evaluation(run, trainee, record["step"])
            summary["evals"][record["step"]] = result
            record.update(result)
        metrics.write(record)
        if evaluate_now:
            draw_curve(run.out_dir)  # loss.png is redrawn at each evaluation

    def stop_if_diverged(step: int, record: dict | None = None) -> None:
        """Exit 1 before a non-finite model is saved or trained on (stopping.divergence)."""
        if problem := divergence(run.precision, trainee.scaler, log, record):
            if record is not None:
                metrics.write(record)  # the line that shows it
            newest = newest_checkpoint(run.out_dir, "good", then=" (resume from it with a "
                                                               "lower lr, say)")
            raise MinibertError(f"step {step}: {problem}: the run has diverged and stops "
                                f"without saving; {newest}")

    def save(step: int) -> None:
        nonlocal last_saved
        stop_if_diverged(step)
        save_checkpoint(run, trainee, step)
        last_saved = step

    if not resumed:  # step 0: the model before any update
        record = {"step": 0}
        write(record, evaluate_now=True)
        if config.init == "random":
            # A fresh model spreads its guesses evenly over the vocabulary: its loss should sit
            # near ln(V). Far above it, the initialisation is off (std too large).
            vocab_size = trainee.model.config.vocab_size
            print0(f"step 0 of a randomly initialised model: eval loss {record['eval_loss']:.4f}"
                   f", ln(vocab size {vocab_size}) = {math.log(vocab_size):.4f}")

    log = TrainingLog(run.device, run.precision, trainee.scaler, start_step=step,
                      total_steps=run.total_steps,
                      tokens_per_step=run.global_batch_size * config.max_seq_length,
                      world_size=run.launch.world_size, peak_tflops=config.peak_tflops,
                      flops_per_token=training_flops_per_token(
                          trainee.model.config, config.max_seq_length, config.mlm_probability))
    # On a GPU the next steps are masked in a background thread while the device computes;
    # on a CPU that thread would only take cores from the step itself.
    ahead = 2 if run.device.type == "cuda" else 0
    count_and_vote = CountAndVote(run.device)
    with StopRequest() as stop, contextlib.closing(log), Prefetcher(
            run.train_blocks, run.layout, run.mask, range(step, run.total_steps), run.device,
            ahead) as batches:
        while step < run.total_steps:
            started = time.perf_counter()
            batch = next(batches)
            # One collective: the step's masked tokens over all ranks (every micro-batch's
            # loss is divided by it), counted on the CPU, and the stop vote. Every rank must
            # stop at the same step; in several processes the vote is read one step after it
            # was cast, so a request made during step t stops after t + 1.
            stop_now, global_count = count_and_vote(stop.requested, batch.count)
            if stop_now:
                break
            lr = trainee.scheduler.get_last_lr()[0]
            step_nll, grad_norm = optimizer_step(trainee, batch, global_count)
            step += 1
            log.add(step_nll, global_count, started, grad_norm)
            is_eval = step == run.total_steps or (config.eval_every
                                                  and step % config.eval_every == 0)
            if step % config.log_every == 0 or is_eval:
                record = log.line(step, lr, grad_norm)
                summary["train_loss"] = record["train_loss"]
                stop_if_diverged(step, record)
                write(record, evaluate_now=is_eval)
            if config.save_every and step % config.save_every == 0:
                save(step)
        count_and_vote.close()
        log.close()
        # Still under StopRequest: a first signal now lets these saves finish, a second one
        # stops at once, and no write leaves anything half-done either way.
        if last_saved != step:
            save(step)
        if step < run.total_steps:  # left the loop early: a stop was requested
            print0(f"stopped at step {step}; continue with --resume")
            # A rank stopped by another rank's vote got no signal itself: report SIGTERM.
            summary.update(stopped=True, step=step, signal=stop.signum or signal.SIGTERM)
            return summary
        save_final(run, trainee.model)
    if run.device.type == "cuda":
        print0(f"peak GPU memory {torch.cuda.max_memory_allocated(run.device) / 2**30:.2f} GiB")
    print0(f"wrote {run.out_dir / 'final'} and {run.out_dir / 'metrics.jsonl'}, "
           f"{run.out_dir / 'loss.png'}")
    summary["step"] = step
    return summary


def describe(run: Run, model: BertForMaskedLM) -> str:
    """The line a run opens with: processes, numerics, model, data, batch and schedule."""
    config, world = run.config, run.launch.world_size
    params = sum(p.numel() for p in model.parameters())
    return (f"{world} process(es) on {run.device.type}, {run.precision}; model "
            f"{params / 1e6:.1f} M parameters; {len(run.train_blocks)} training blocks of "
            f"{config.max_seq_length} tokens, {len(run.eval_blocks)} evaluation blocks; global "
            f"batch {run.global_batch_size} ({config.batch_size} x {config.grad_accum} "
            f"accumulation x {world}); {run.steps_per_epoch} steps per epoch, "
            f"{run.total_steps} steps, {run.warmup_steps} warmup")


def run_evaluation(run: Run, trainee: Trainee, step: int) -> dict:
    """evaluate() on the run's validation blocks with its settings, and its line printed."""
    config = run.config
    result = evaluate(trainee.model, run.eval_blocks, run.mask, seed=config.eval_seed,
                      batch_size=config.eval_batch_size or config.batch_size,
                      device=run.device, precision=run.precision)
    result["eval_masking"] = "whole-word" if config.whole_word_mask else "token"
    print0(f"step {step}: eval loss {result['eval_loss']:.4f}, perplexity "
           f"{result['eval_perplexity']:.2f}, accuracy {result['eval_accuracy']:.4f}")
    return result


def draw_curve(out_dir: Path) -> None:
    """out_dir/loss.png from out_dir/metrics.jsonl (rank 0 draws it)."""
    if is_main():
        plot_runs([out_dir], out_dir / "loss.png")


def save_checkpoint(run: Run, trainee: Trainee, step: int) -> None:
    """checkpoints/step-N (rank 0 writes it; every rank hands over its RNG state)."""
    rng_states = distributed.all_gather_object(rng_state(run.device))
    folder = run.out_dir / "checkpoints" / f"step-{step}"
    if is_main():
        epoch, step_in_epoch = run.layout.epoch_and_step(step)
        save_training_state(
            folder, model=trainee.model,
            tokenizer_source=run.tokenizer_source, optimizer=trainee.optimizer,
            scheduler=trainee.scheduler, scaler=trainee.scaler, rng_states=rng_states,
            config=asdict(run.config),
            position=DataPosition(step, epoch, step_in_epoch, run.global_batch_size,
                                  len(run.train_blocks)))
        prune(run.out_dir, run.config.keep_last, keep=folder)  # now that the new one is on disk
    run.tokenizer_source = folder / "model"


def save_final(run: Run, model: BertForMaskedLM) -> None:
    """out_dir/final: the trained model alone, a checkpoint for fill-mask and conversion."""
    if is_main():
        try:
            save_pretrained(model, run.out_dir / "final", tokenizer_source=run.tokenizer_source,
                            overwrite=True)
        except DiskFullError as error:
            raise DiskFullError(error.target, error.free,
                                tensor_bytes(model.state_dict())) from None


# ---------------------------------------------------------------------------------------------


def train(config: TrainConfig, environ: Mapping[str, str]) -> dict:
    """The whole run: setup -> build -> fit (evaluating as it goes). `environ` holds torchrun's
    variables (the script passes os.environ); returns fit's summary."""
    try:
        run = setup(config, environ)
        if run.resume_from is not None:
            step = checkpoint_step(run.resume_from)
            if done := nothing_to_do(step, run.total_steps, config):
                if not (run.out_dir / "final").exists():
                    # Killed between its last checkpoint and final/ (or the disk was full):
                    # the checkpoint holds the weights final/ would have held.
                    save_final(run, run.model)
                    done += f"; wrote the missing {run.out_dir / 'final'} from {run.resume_from}"
                print0(done)  # else final/ stays as the finished run wrote it
                return {"start_step": step, "step": step, "stopped": False, "evals": {}}
        trainee = build(config, run)
        try:
            return fit(config, run, trainee)
        except DiskFullError as error:  # the run's own writes; rank 0 only
            raise MinibertError(f"{error}; {newest_checkpoint(run.out_dir)}") from None
    finally:
        distributed.cleanup()
