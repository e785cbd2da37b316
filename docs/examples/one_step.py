"""Chapter 4's numbers: one training step of masked-LM, written out whole.

    python docs/examples/one_step.py                        # assets at ../shared/assets
    python docs/examples/one_step.py --max-grad-norm 0      # no clipping: what changes?
    python docs/examples/one_step.py --lr 1e-2              # a ten times larger step

`make_optimizer` and `train_step` below are what minibert's training loop does for one
optimizer step in one process, in fp32, without gradient accumulation: mask a batch, forward,
the loss as the sum over the masked tokens divided by their count, backward, clip, AdamW and
the learning-rate schedule. Chapter 4 shows them whole. main() runs one step of bert-tiny on 8
WikiText-2 blocks, prints what the chapter quotes, and checks that minibert's own
`optimizer_step` (minibert/optimizer.py, which the loop calls) gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from minibert import load_pretrained, load_tokenizer
from minibert.batches import StepBatch
from minibert.data import load_blocks
from minibert.masking import IGNORE_INDEX, make_masker
from minibert.optimizer import Trainee, linear_schedule, optimizer_step, parameter_groups

REPO = Path(__file__).resolve().parents[2]


def make_optimizer(model, *, lr, warmup_steps, total_steps, weight_decay=0.01):
    # AdamW; weight decay on the weight matrices only, not on biases and LayerNorm (as BERT).
    groups = parameter_groups(model, weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    # The learning rate of update i is lr x factor(i): linear warmup, then linear decay.
    factor = linear_schedule(warmup_steps, total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(model, optimizer, scheduler, inputs, labels, max_grad_norm):
    model.train()  # dropout on
    # Forward: logits at the masked positions only, (targets, vocab), and their labels.
    logits, targets = model.masked_logits(inputs, labels)
    # The loss: the negative log-likelihood summed over the targets, divided by their count.
    nll = F.cross_entropy(logits, targets, reduction="sum")
    loss = nll / targets.numel()
    # Backward: d loss / d parameter, into every parameter's .grad.
    loss.backward()
    # Clip: when the norm of all gradients together exceeds max_grad_norm, scale them down.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               max_grad_norm or float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()  # AdamW: each weight moves by about lr at most
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()  # the next update's learning rate
    return nll.item(), targets.numel(), grad_norm.item(), lr


def eval_loss(model, inputs, labels) -> float:
    """The same loss with dropout off and no gradients."""
    model.eval()
    with torch.no_grad():
        return model(inputs, labels=labels).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to cache the tokenized blocks (default: a temporary folder)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip the gradient norm to this; 0: no clipping (1.0)")
    args = parser.parse_args()
    folder = args.assets / "checkpoints" / "bert-tiny-splade-mlm"
    tokenizer = load_tokenizer(folder)
    model = load_pretrained(folder)
    with tempfile.TemporaryDirectory() as temporary:
        blocks = load_blocks({"test": args.assets / "corpus" / "wikitext-2-raw" / "wiki.test.raw"},
                             "test", tokenizer, max_seq_length=128,
                             cache_dir=args.cache_dir or temporary, show_progress=False)
        blocks = torch.from_numpy(blocks[:8].copy()).long()  # (8, 128)
    mask = make_masker(tokenizer, vocab_size=tokenizer.get_vocab_size())
    inputs, labels = mask(blocks, range(8), seed=0, epoch=0)
    before = copy.deepcopy(model)
    optimizer, scheduler = make_optimizer(model, lr=args.lr, warmup_steps=2, total_steps=10)

    print(f"== one step: bert-tiny, {len(blocks)} blocks of {blocks.shape[1]} tokens, fp32, "
          f"one process ==")
    chosen = labels != IGNORE_INDEX
    as_mask = int((chosen & (inputs == tokenizer.token_to_id("[MASK]"))).sum())
    kept = int((chosen & (inputs == blocks)).sum())
    n = int(chosen.sum())
    print(f"mask: {n} targets ({n // len(blocks)} a block): [MASK] {as_mask}, random "
          f"{n - as_mask - kept}, kept {kept}")
    loss_before = eval_loss(model, inputs, labels)
    torch.manual_seed(0)  # dropout's draws, so that the check below can repeat them
    nll, count, grad_norm, lr = train_step(model, optimizer, scheduler, inputs, labels,
                                           args.max_grad_norm)
    vocab_size = tokenizer.get_vocab_size()
    print(f"loss = summed NLL {nll:.2f} / {count} targets = {nll / count:.4f} (uniform "
          f"guessing: ln {vocab_size} = {math.log(vocab_size):.2f})")
    if args.max_grad_norm:
        print(f"gradient norm {grad_norm:.3f}, clipped to {args.max_grad_norm:g}: every gradient "
              f"multiplied by {min(1.0, args.max_grad_norm / grad_norm):.3f}")
    else:
        print(f"gradient norm {grad_norm:.3f}, not clipped (max_grad_norm 0)")
    moved = torch.cat([(p - q).abs().flatten()
                       for p, q in zip(model.parameters(), before.parameters())])
    print(f"update 1 of 10 (2 of warmup) at lr {lr:.6f}: median weight change "
          f"{moved.median():.6f}, largest {moved.max():.6f}")
    print(f"the same {len(blocks)} blocks and masks, dropout off: loss {loss_before:.4f} before "
          f"the step, {eval_loss(model, inputs, labels):.4f} after")

    # The loop's own step on a copy of the model from before: the same update?
    optimizer, scheduler = make_optimizer(before, lr=args.lr, warmup_steps=2, total_steps=10)
    trainee = Trainee(before, before, optimizer, scheduler,
                      torch.amp.GradScaler("cpu", enabled=False), start_step=0,
                      precision="fp32", world_size=1, max_grad_norm=args.max_grad_norm)
    batch = StepBatch(inputs[None], labels[None], torch.tensor(count),
                      max_targets=int(chosen.sum(dim=1).max()))
    torch.manual_seed(0)
    optimizer_step(trainee, batch, global_count=torch.tensor(count))
    same = all(torch.allclose(p, q, rtol=1e-5, atol=1e-7)
               for p, q in zip(model.parameters(), before.parameters()))
    print(f"same weights as minibert.optimizer.optimizer_step, the training loop's step: {same}")


if __name__ == "__main__":
    main()
