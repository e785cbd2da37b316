"""Masked-LM evaluation: exact loss, perplexity and accuracy of a model on fixed masks.

    python -m minibert.evaluate --model runs/quickstart/final \\
        --data ../shared/assets/corpus/wikipedia-sample --max_seq_length 128 --max_blocks 256
    python -m minibert.evaluate --model M --data ../shared/assets/corpus/wikitext-2-raw --split test
    torchrun --standalone --nproc_per_node=2 -m minibert.evaluate --model M --data D  # same numbers
    minibert-evaluate --model M --data D --device cpu --precision fp32

    result = evaluate(model, blocks, mask, seed=0, batch_size=32, device=device,
                      precision="fp32")   # {"eval_loss", "eval_perplexity", "eval_accuracy"}

The trainer calls `evaluate` at every evaluation step. Masks come from (seed, EVAL_EPOCH, block
index) alone, so every evaluation of every run with the same eval_seed masks the same tokens,
and the numbers are comparable across steps and runs.

The command measures a checkpoint without training. It reads the split, cuts it into blocks
and masks them exactly as train.py's evaluation does, so with a run's max_seq_length,
mlm_probability, eval_seed and precision, and --max_blocks set to its eval_max_blocks, it
prints the number the run printed; batch size and process count change it only by rounding.
Its defaults are train.py's (tests/test_evaluate.py runs both with their defaults and compares),
and `check_settings` is the one definition of what the settings they share may be.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import distributed
from .checkpoint import read_checkpoint
from .cli import ArgumentParser
from .data import available_splits, check_splits, load_blocks, normalize_split
from .distributed import all_reduce_sum, is_main, print0
from .errors import MinibertError, run_main
from .masking import make_masker
from .model import BertForMaskedLM
from .precision import (autocast, check_device, check_precision, precision_warning, resolve_device,
                        resolve_precision)
from .tokenizer import load_tokenizer

EVAL_EPOCH = 0  # evaluation masks always use this epoch (with the eval seed): fixed masks


@torch.no_grad()
def evaluate(model: BertForMaskedLM, blocks: np.ndarray, mask: Callable, *, seed: int,
             batch_size: int, device: torch.device, precision: str) -> dict[str, float]:
    """Masked-LM loss, perplexity and accuracy over `blocks`, exact across ranks
    (`masked_lm_sums`, then divided). The model's train/eval mode is restored afterwards."""
    nll, count, correct = masked_lm_sums(model, blocks, mask, seed=seed, batch_size=batch_size,
                                         device=device, precision=precision)
    loss, perplexity, accuracy = metrics(nll, count, correct)
    return {"eval_loss": loss, "eval_perplexity": perplexity, "eval_accuracy": accuracy}


@torch.no_grad()
def masked_lm_sums(model: BertForMaskedLM, blocks: np.ndarray, mask: Callable, *, seed: int,
                   batch_size: int, device: torch.device, precision: str,
                   show_progress: bool = False) -> tuple[float, int, int]:
    """(summed NLL, masked tokens, correctly predicted masked tokens) over `blocks`, in eval
    mode, summed over all ranks.

    Each rank takes a contiguous share of the blocks (shares may differ by one: nothing is
    padded or repeated), sums the NLL and counts masked and correctly predicted tokens; the
    three sums are all-reduced, and only then divided (`metrics`). Masks come from (seed,
    EVAL_EPOCH, block index), the same at every evaluation, so numbers are comparable across
    steps and runs.
    """
    was_training = model.training
    model.eval()
    share = np.array_split(np.arange(len(blocks)), distributed.world_size())[distributed.rank()]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, masked tokens, correct
    try:
        for start in tqdm(range(0, len(share), batch_size), desc="evaluating", unit="batch",
                          disable=not show_progress, dynamic_ncols=True):
            rows = share[start:start + batch_size]
            input_ids = torch.from_numpy(blocks[rows]).long()
            inputs, labels = mask(input_ids, rows, seed=seed, epoch=EVAL_EPOCH)
            with autocast(device, precision):
                logits, targets = model.masked_logits(inputs.to(device), labels.to(device))
            logits = logits.float()  # (num_masked, vocab)
            sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
            sums[1] += targets.numel()
            sums[2] += (logits.argmax(dim=-1) == targets).sum()
    finally:
        model.train(was_training)
    nll, count, correct = all_reduce_sum(sums).tolist()
    return nll, int(count), int(correct)


def metrics(nll: float, count: int, correct: int) -> tuple[float, float, float]:
    """(loss, perplexity, accuracy) from the sums: loss = NLL / count, perplexity = exp(loss)."""
    if count == 0:
        raise MinibertError("evaluation has no masked tokens (no validation blocks?)")
    loss = nll / count
    return loss, math.exp(min(loss, 700.0)), correct / count


# ---------------------------------------------------------------------------------------------
# The command


def check_settings(*, max_seq_length: int, eval_seed: int, mlm_probability: float,
                   precision: str, device: str) -> None:
    """What the settings that decide an evaluation's numbers may be: one definition, for the
    command's arguments and for train.py's config (whose evaluation uses the same settings).
    A bad one is a one-line MinibertError."""
    for name, value, ok, requirement in (
            ("max_seq_length", max_seq_length, max_seq_length >= 3, ">= 3 ([CLS], a token, [SEP])"),
            ("eval_seed", eval_seed, eval_seed >= 0, ">= 0"),
            ("mlm_probability", mlm_probability, 0.0 < mlm_probability <= 1.0, "in (0, 1]")):
        if not ok:
            raise MinibertError(f"{name} must be {requirement}, got {value!r}")
    check_precision(precision)
    check_device(device)


def check_block_length(max_seq_length: int, model: BertForMaskedLM) -> None:
    """Blocks of max_seq_length tokens fit the model's position embeddings (RoBERTa's hold
    pad_token_id + 1 fewer tokens than positions: BertConfig.max_sequence_length)."""
    config = model.config
    if max_seq_length > config.max_sequence_length:
        offset = ("" if config.max_sequence_length == config.max_position_embeddings else
                  f": {config.max_sequence_length} tokens, counted from pad_token_id + 1")
        raise MinibertError(f"max_seq_length {max_seq_length} exceeds the model's "
                            f"max_position_embeddings ({config.max_position_embeddings}{offset})")


@dataclass
class EvaluateArgs:
    """What `python -m minibert.evaluate` measures. Defaults are train.py's (TrainConfig's), so
    that the same settings give the same number as a training run's evaluation."""

    model: str  # checkpoint folder (minibert or HuggingFace) or hub id
    data: str  # hub dataset name, or a folder with train/valid/test text files
    split: str = "validation"  # train|validation|test ("valid" is accepted)
    max_seq_length: int = 512  # tokens per block, [CLS] and [SEP] included
    batch_size: int = 32  # sequences per forward pass on each process (changes only rounding)
    eval_seed: int = 0  # seeds the fixed masks (train.py's eval_seed)
    mlm_probability: float = 0.15  # fraction of each block's tokens masked
    max_blocks: int | None = None  # the first N blocks only (train.py's eval_max_blocks)
    whole_word_mask: bool = False  # mask whole words (train.py's setting)
    precision: str = "auto"  # auto|fp32|fp16|bf16; auto: native bf16, else fp16 (GPU), fp32 (CPU)
    device: str = "auto"  # auto|cpu|cuda; auto: cuda when a GPU is visible
    cache_dir: str = "~/.cache/minibert"  # where tokenized blocks are cached (as train.py)
    json: bool = False  # one JSON object instead of the plain listing

    def __post_init__(self) -> None:
        self.split = normalize_split(self.split)
        check_settings(max_seq_length=self.max_seq_length, eval_seed=self.eval_seed,
                       mlm_probability=self.mlm_probability, precision=self.precision,
                       device=self.device)
        for name in ("batch_size", "max_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MinibertError(f"{name} must be >= 1, got {value!r}")


def evaluate_checkpoint(args: EvaluateArgs, launch: distributed.Launch,
                        show_progress: bool = False) -> dict:
    """Read the model and the split, evaluate; every rank returns the same result:
    {"loss", "perplexity", "accuracy", "blocks", "masked_tokens", "model", "data", "split"}.
    Joins the process group when `launch` has several processes (the caller leaves it)."""
    device = distributed.init(launch, resolve_device(args.device))
    precision = resolve_precision(args.precision, device)
    if (warning := precision_warning(precision, device)) and is_main():
        print(warning, file=sys.stderr)

    # A checkpoint without a masked-LM head is refused: a random head's perplexity measures
    # nothing, and would differ between the processes of one evaluation.
    model, folder, notices = read_checkpoint(args.model, require_head=True)
    for notice in notices:
        if is_main():
            print(f"note: {notice}", file=sys.stderr)
    check_block_length(args.max_seq_length, model)
    tokenizer = load_tokenizer(folder)
    try:
        check_splits(args.data, [args.split])
    except MinibertError as error:
        there = available_splits(args.data)
        raise MinibertError(f"{error}; pass --split {there[0]}" if there else str(error)) from None
    # Every rank calls load_blocks; its file lock lets one of them tokenize, the others wait.
    blocks = load_blocks(args.data, args.split, tokenizer, max_seq_length=args.max_seq_length,
                         cache_dir=Path(args.cache_dir).expanduser(),
                         show_progress=show_progress and is_main())
    blocks = blocks[:args.max_blocks]  # [:None] keeps them all
    mask = make_masker(tokenizer, vocab_size=model.config.vocab_size,
                       mlm_probability=args.mlm_probability,
                       whole_word_mask=args.whole_word_mask)
    nll, count, correct = masked_lm_sums(model.to(device), blocks, mask, seed=args.eval_seed,
                                         batch_size=args.batch_size, device=device,
                                         precision=precision,
                                         show_progress=show_progress and is_main())
    loss, perplexity, accuracy = metrics(nll, count, correct)
    return {"loss": loss, "perplexity": perplexity, "accuracy": accuracy, "blocks": len(blocks),
            "masked_tokens": count, "model": args.model, "data": args.data, "split": args.split,
            "masking": "whole-word" if args.whole_word_mask else "token"}


def format_result(result: dict, max_seq_length: int) -> str:
    """The plain listing: where the numbers come from, then the numbers (rounded as train.py
    rounds its evaluation line)."""
    return "\n".join([
        f"model          {result['model']}",
        f"data           {result['data']} ({result['split']})",
        f"blocks         {result['blocks']} of {max_seq_length} tokens",
        f"masked tokens  {result['masked_tokens']} ({result['masking']} masking)",
        f"loss           {result['loss']:.4f}",
        f"perplexity     {result['perplexity']:.2f}",
        f"accuracy       {result['accuracy']:.4f}"])


def parse_args(argv: list[str] | None = None) -> EvaluateArgs:
    defaults = EvaluateArgs(model="", data="")
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", required=True,
                        help="minibert or HuggingFace checkpoint folder, or a hub id")
    parser.add_argument("--data", required=True,
                        help="a folder with wiki.{train,valid,test}.raw, {train,valid,test}.txt "
                             "or subfolders train/ valid/ test/ of text files; or "
                             "wikitext-2-raw-v1 or wikitext-103-raw-v1 from the HuggingFace hub "
                             "(offline: from its cache, with HF_DATASETS_OFFLINE=1)")
    parser.add_argument("--split", default=defaults.split,
                        help="train, validation or test (default validation)")
    for name, kind, text in (
            ("max_seq_length", int, "tokens per block, [CLS] and [SEP] included"),
            ("batch_size", int, "sequences per forward pass on each process"),
            ("eval_seed", int, "seeds the fixed masks (train.py's eval_seed)"),
            ("mlm_probability", float, "fraction of each block's tokens that are masked"),
            ("max_blocks", int, "evaluate the first N blocks only (train.py's eval_max_blocks)"),
            ("precision", str, "auto, fp32, fp16 or bf16; auto: bf16 where the hardware "
                               "computes it natively, else fp16 on a GPU, fp32 on a CPU"),
            ("device", str, "auto, cpu or cuda; auto: cuda when a GPU is visible"),
            ("cache_dir", str, "where tokenized blocks are cached (shared with train.py)")):
        parser.add_argument(f"--{name}", type=kind, default=getattr(defaults, name),
                            help=f"{text} (default {getattr(defaults, name)})")
    parser.add_argument("--whole_word_mask", action="store_true",
                        help="mask whole words, as a run trained with whole_word_mask = true "
                             "evaluates")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: loss, perplexity, accuracy, blocks, "
                             "masked_tokens, model, data, split, masking")
    return EvaluateArgs(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m minibert.evaluate` and the minibert-evaluate command."""
    def run() -> None:
        args = parse_args(argv)
        try:
            # Progress bars only for a person watching: in a log or a pipe they are noise.
            result = evaluate_checkpoint(args, distributed.launch_from_env(os.environ),
                                         show_progress=sys.stderr.isatty())
            # Before cleanup: without a process group every process is rank 0 and would print.
            print0(json.dumps(result) if args.json else format_result(result, args.max_seq_length))
        finally:
            distributed.cleanup()
    run_main(run)


if __name__ == "__main__":
    main()
