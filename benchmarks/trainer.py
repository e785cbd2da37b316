"""The whole training loop, end to end: train.py against the recipe people run instead.

    python benchmarks/trainer.py --device cpu --threads 2   # bert-tiny, 128 x 8: < 3 min, 2 cores
    python benchmarks/trainer.py --device cuda              # random bert-base, seq 512 x 32, bf16
    python benchmarks/trainer.py --device cuda --compile --step-baseline

minibert: `minibert.trainer.train`, what train.py runs: data from the tokenized-block cache,
masking, forward, backward, clipping, fused AdamW, the schedule, logging every 10 steps.
The recipe: transformers' BertForMaskedLM with DataCollatorForLanguageModeling in a plain
PyTorch loop as in examples/pytorch/language-modeling/run_mlm_no_trainer.py: a shuffled
DataLoader whose collator pads and masks every batch, forward under autocast, backward,
AdamW (torch's default implementation, as the script builds it), the linear schedule, the
loss read every 10 steps. Both start from the same weights and read the same blocks of the
same corpus (minibert's blocks, handed to the recipe as the rows group_texts would have
made), with the same batch, precision, learning rate, schedule and number of steps.

The two loops run in turn, whole runs alternating (A B, B A, ...). tokens/s counts the
steps after the first --warmup steps of each run (compiling happens there), over the wall
time of those steps: for minibert from the tokens_per_s and "steps" of its metrics lines,
which time every step from fetching its batch to the end of the update; for the recipe
from a clock read (after a device sync) at the end of the warm-up and at the end. The last
line is the ratio of the two.

--step-baseline also times minibert's bare training step (benchmarks/train_step.py's, one
fixed batch, no data, no masking, no logging) at the same shape and precision, in the same
process after the loops: how close train.py comes to the speed of its own step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ASSETS, interleaved, median, paired_models, synchronize
from minibert.checkpoint import read_checkpoint, save_pretrained
from minibert.data import load_blocks
from minibert.flops import mfu, peak_tflops, training_flops_per_token
from minibert.masking import special_token_ids
from minibert.model import BertConfig
from minibert.tokenizer import load_tokenizer
from minibert.train_config import TrainConfig
from minibert.trainer import train

BERT_TINY = ASSETS / "checkpoints" / "bert-tiny-splade-mlm"
CORPUS = ASSETS / "corpus" / "wikipedia-sample"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULTS = {  # per device: what the targets are stated for
    "cpu": dict(seq=128, batch=8, steps=60, warmup=20, precision="bf16"),
    "cuda": dict(seq=512, batch=32, steps=60, warmup=20, precision="bf16"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", help="checkpoint folder (default: bert-tiny from the shared "
                        "assets on cpu, a random bert-base on cuda)")
    parser.add_argument("--seq", type=int, help="tokens per block (cpu 128, cuda 512)")
    parser.add_argument("--batch", type=int, help="sequences per micro-batch (cpu 8, cuda 32)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, help="optimizer steps per run (cpu and cuda 60)")
    parser.add_argument("--warmup", type=int, help="untimed steps at the start of each run "
                        "(default 20; a multiple of 10, the logging interval)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each implementation")
    parser.add_argument("--precision", choices=sorted(DTYPES), help="cpu and cuda: bf16")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="compile = true for minibert")
    parser.add_argument("--reference-optimizer", choices=("default", "fused"),
                        default="default", help="the recipe's AdamW: torch's default "
                        "implementation (as run_mlm_no_trainer.py) or fused=True")
    parser.add_argument("--step-baseline", action="store_true",
                        help="also time minibert's bare step at the same shape")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup % 10 or not 0 < args.warmup < args.steps:
        parser.error("--warmup must be a multiple of 10 and below --steps")
    return args


# ---------------------------------------------------------------------------------------------
# the same weights and the same blocks for both


def prepare_model(args: argparse.Namespace, folder: Path):
    """A minibert checkpoint folder and the transformers model with the same weights."""
    import transformers

    if args.model or args.device == "cpu":
        source = Path(args.model) if args.model else BERT_TINY
        minibert_model, vocab_folder, _ = read_checkpoint(source)
        hf = transformers.BertForMaskedLM.from_pretrained(source)
        return source, hf, minibert_model.config
    config = BertConfig()  # bert-base, random: the hub's weights are not available offline
    models = paired_models(config, seed=0)
    save_pretrained(models["minibert"], folder / "model", tokenizer_source=BERT_TINY)
    return folder / "model", models["transformers"], config


def recipe_dataset(blocks: np.ndarray, tokenizer):
    """The blocks as the rows run_mlm_no_trainer.py's group_texts produces."""
    import datasets

    ids = blocks.astype(np.int64)
    special = np.isin(ids, special_token_ids(tokenizer))
    return datasets.Dataset.from_dict({
        "input_ids": ids.tolist(), "token_type_ids": np.zeros_like(ids).tolist(),
        "attention_mask": np.ones_like(ids).tolist(),
        "special_tokens_mask": special.astype(np.int64).tolist()})


# ---------------------------------------------------------------------------------------------
# the two loops


def run_minibert(args, model_folder: Path, out_dir: Path, cache_dir: Path) -> float:
    """train.py's loop; tokens/s over the steps after the warm-up, from its metrics lines."""
    config = TrainConfig(
        model=str(model_folder), data=str(CORPUS), out_dir=str(out_dir),
        cache_dir=str(cache_dir), max_seq_length=args.seq, batch_size=args.batch,
        grad_accum=args.grad_accum, max_steps=args.steps, lr=1e-4, warmup_steps=10,
        precision=args.precision, device=args.device, compile=args.compile, log_every=10,
        eval_every=0, eval_max_blocks=1, save_every=0, overwrite=True)
    with open(os.devnull, "w") as quiet:  # its progress bar and messages
        with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
            train(config, environ={})
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in lines if "tokens_per_s" in r and r["step"] > args.warmup]
    tokens = sum(r["steps"] for r in timed) * args.batch * args.grad_accum * args.seq
    seconds = sum(r["steps"] * args.batch * args.grad_accum * args.seq / r["tokens_per_s"]
                  for r in timed)
    return tokens / seconds


def run_recipe(args, hf_model, dataset, tokenizer, device: torch.device) -> float:
    """run_mlm_no_trainer.py's loop, without accelerate (one process)."""
    import transformers

    model = copy.deepcopy(hf_model).to(device)
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    loader = torch.utils.data.DataLoader(dataset, shuffle=True, collate_fn=collator,
                                         batch_size=args.batch)
    no_decay = ["bias", "LayerNorm.weight"]
    groups = [{"params": [p for n, p in model.named_parameters()
                          if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters()
                          if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-4,
                                  **({"fused": True} if args.reference_optimizer == "fused"
                                     else {}))
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=10,
                                           num_training_steps=args.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    autocast = (torch.autocast(device.type, DTYPES[args.precision])
                if DTYPES[args.precision] else contextlib.nullcontext())
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epochs back to back
    model.train()
    start = None
    for step in range(1, args.steps + 1):
        for _ in range(args.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with autocast:
                loss = model(**batch).loss / args.grad_accum
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
        if step % 10 == 0:
            loss.item()  # the loss a log line would print
        if step == args.warmup:
            synchronize(device)
            start = time.perf_counter()
    synchronize(device)
    seconds = time.perf_counter() - start
    return (args.steps - args.warmup) * args.batch * args.grad_accum * args.seq / seconds


def bare_step_speed(args, model_folder: Path, blocks: np.ndarray, mask,
                    device: torch.device) -> float:
    """minibert's step alone (benchmarks/train_step.py's make_step) on one batch of blocks."""
    from train_step import TrainStepArgs, make_step

    model, _, _ = read_checkpoint(model_folder)
    model = model.to(device)
    if args.compile:
        model = torch.compile(model)
    rows = np.arange(args.batch)
    inputs, labels = mask(torch.from_numpy(blocks[rows]).long(), rows, seed=0, epoch=0)
    step_args = TrainStepArgs(seq=args.seq, batch=args.batch, precision=args.precision,
                              device=args.device)
    step = make_step("minibert", model, (inputs.to(device), None, labels.to(device)),
                     step_args, device)
    seconds = interleaved({"minibert": step}, repeats=30, warmup=args.warmup, device=device)
    return args.batch * args.seq / median(seconds["minibert"])


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_folder, hf_model, config = prepare_model(args, tmp)
        tokenizer = load_tokenizer(model_folder)
        blocks = load_blocks(str(CORPUS), tokenizer=tokenizer, max_seq_length=args.seq,
                             cache_dir=tmp / "cache", split="train", show_progress=False)
        hf_tokenizer = transformers.BertTokenizerFast(vocab_file=str(model_folder / "vocab.txt"))
        dataset = recipe_dataset(blocks, tokenizer)
        where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"cpu, {torch.get_num_threads()} threads")
        print(f"trainer: {config.num_hidden_layers} layers, hidden {config.hidden_size}; "
              f"{len(blocks)} blocks of {args.seq} tokens; batch {args.batch} x "
              f"{args.grad_accum}; {args.precision}; {args.steps} steps per run, the first "
              f"{args.warmup} untimed; {where}; torch {torch.__version__}, transformers "
              f"{transformers.__version__}; minibert {'compiled' if args.compile else 'eager'}, "
              f"recipe eager with AdamW {args.reference_optimizer}")
        speeds: dict[str, list[float]] = {"minibert": [], "transformers": []}
        runs = {"minibert": lambda i: run_minibert(args, model_folder, tmp / f"run-{i}",
                                                   tmp / "cache"),
                "transformers": lambda i: run_recipe(args, hf_model, dataset, hf_tokenizer,
                                                     device)}
        for i in range(args.rounds):
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                speed = runs[name](i)
                speeds[name].append(speed)
                print(f"round {i + 1}: {name:13}{speed:>12,.0f} tokens/s", flush=True)

        peak = (peak_tflops(torch.cuda.get_device_name(device), args.precision)
                if device.type == "cuda" else None)
        flops_per_token = training_flops_per_token(config, args.seq)
        mean = {name: sum(v) / len(v) for name, v in speeds.items()}
        for name, speed in mean.items():
            achieved = mfu(speed, flops_per_token, peak)
            print(f"{name:13}{speed:>12,.0f} tokens/s (mean of {args.rounds} runs)"
                  + (f", MFU {achieved:.1%}" if achieved is not None else ""))
        if args.step_baseline:
            from minibert.masking import make_masker
            mask = make_masker(tokenizer, vocab_size=config.vocab_size)
            step_speed = bare_step_speed(args, model_folder, blocks, mask, device)
            achieved = mfu(step_speed, flops_per_token, peak)
            print(f"minibert step alone (train_step.py): {step_speed:,.0f} tokens/s"
                  + (f", MFU {achieved:.1%}" if achieved is not None else "")
                  + f"; train.py loop / step: {mean['minibert'] / step_speed:.1%}")
        print(f"ratio minibert/transformers tokens/s, whole training loop: "
              f"{mean['minibert'] / mean['transformers']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
