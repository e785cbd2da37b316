"""Masked-LM evaluation: exact loss, perplexity and accuracy of a model on fixed masks.

    result = evaluate(model, blocks, mask, seed=0, batch_size=32, device=device,
                      precision="fp32")   # {"eval_loss", "eval_perplexity", "eval_accuracy"}

The trainer calls this at every evaluation step. Masks come from (seed, EVAL_EPOCH, block
index) alone, so every evaluation of every run with the same eval_seed masks the same tokens,
and the numbers are comparable across steps and runs.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .distributed import all_reduce_sum
from .errors import MinibertError
from .model import BertForMaskedLM
from .precision import autocast

EVAL_EPOCH = 0  # evaluation masks always use this epoch (with the eval seed): fixed masks


@torch.no_grad()
def evaluate(model: BertForMaskedLM, blocks: np.ndarray, mask: Callable, *, seed: int,
             batch_size: int, device: torch.device, precision: str) -> dict[str, float]:
    """Masked-LM loss, perplexity and accuracy over `blocks`, exact across ranks.

    Each rank takes a contiguous share of the blocks (shares may differ by one: nothing is
    padded or repeated), sums the NLL and counts masked and correctly predicted tokens; the
    three sums are all-reduced, then divided. Masks come from (seed, EVAL_EPOCH, block index),
    the same at every evaluation, so numbers are comparable across steps and runs.
    """
    was_training = model.training
    model.eval()
    share = np.array_split(np.arange(len(blocks)), distributed.world_size())[distributed.rank()]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, masked tokens, correct
    for start in range(0, len(share), batch_size):
        rows = share[start:start + batch_size]
        input_ids = torch.from_numpy(blocks[rows]).long()
        inputs, labels = mask(input_ids, rows, seed=seed, epoch=EVAL_EPOCH)
        with autocast(device, precision):
            logits, targets = model.masked_logits(inputs.to(device), labels.to(device))
        logits = logits.float()  # (num_masked, vocab)
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += targets.numel()
        sums[2] += (logits.argmax(dim=-1) == targets).sum()
    nll, count, correct = all_reduce_sum(sums).tolist()
    model.train(was_training)
    if count == 0:
        raise MinibertError("evaluation has no masked tokens (no validation blocks?)")
    loss = nll / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
            "eval_accuracy": correct / count}
