"""Chapter 2's numbers: blocks, masks, labels, and the perplexity of a real checkpoint.

    python docs/examples/masking.py                         # assets at ../shared/assets
    python docs/examples/masking.py --assets PATH --eval-blocks 0   # 0: the whole test split

It cuts the real WikiText-2 test split into 128-token blocks with minibert.data, masks them with
minibert.masking exactly as training and evaluation do, and measures bert-tiny's masked-LM
loss, perplexity and accuracy with `minibert.evaluate.evaluate`, the trainer's own.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from minibert import load_pretrained, load_tokenizer
from minibert.data import corpus_stats, load_blocks
from minibert.masking import IGNORE_INDEX, mask_batch, special_token_ids
from minibert.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to cache the tokenized blocks (default: a temporary folder)")
    parser.add_argument("--eval-blocks", type=int, default=128,
                        help="evaluate on the first N test blocks (0: all of them)")
    args = parser.parse_args()
    folder = args.assets / "checkpoints" / "bert-tiny-splade-mlm"
    tokenizer = load_tokenizer(folder)
    model = load_pretrained(folder)

    print("== blocks ==")
    with tempfile.TemporaryDirectory() as temporary:
        cache = args.cache_dir or temporary
        blocks = load_blocks({"test": args.assets / "corpus" / "wikitext-2-raw" / "wiki.test.raw"},
                             "test", tokenizer, max_seq_length=128, cache_dir=cache,
                             show_progress=False)
        blocks = torch.from_numpy(blocks.copy()).long()
    stats = corpus_stats(blocks.numpy())
    print(f"WikiText-2 test split at max_seq_length 128: {stats['blocks']} blocks, "
          f"{stats['tokens']:,} tokens of text")
    first = tokenizer.decode(blocks[0, :12].tolist(), skip_special_tokens=False)
    print(f"block 0 starts: {first} ...")

    # What training and evaluation call, with this tokenizer's ids filled in.
    def mask(input_ids, indices, *, seed, epoch):
        return mask_batch(input_ids, indices, seed=seed, epoch=epoch,
                          mask_token_id=tokenizer.token_to_id("[MASK]"),
                          special_token_ids=special_token_ids(tokenizer),
                          vocab_size=tokenizer.get_vocab_size())

    print("== one block, masked ==")
    inputs, labels = mask(blocks[:1], [0], seed=0, epoch=0)
    inputs, labels, original = inputs[0], labels[0], blocks[0]
    targets = (labels != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    print(f"special ids, never chosen: {special_token_ids(tokenizer)}")
    print(f"targets: {len(targets)} of {len(original) - 2} maskable tokens")
    print(f"labels[:8]: {labels[:8].tolist()}")
    print("  position  original      input         label")
    for p in targets:
        kind = ("[MASK]" if inputs[p] == tokenizer.token_to_id("[MASK]")
                else "kept" if inputs[p] == original[p] else "random")
        print(f"  {p:<8}  {tokenizer.id_to_token(int(original[p])):<12}  "
              f"{tokenizer.id_to_token(int(inputs[p])):<12}  {int(labels[p]):<6}  {kind}")

    print("== the rule, measured on every block ==")
    indices = list(range(len(blocks)))
    inputs, labels = mask(blocks, indices, seed=0, epoch=0)
    chosen = labels != IGNORE_INDEX
    maskable = ~torch.isin(blocks, torch.tensor(special_token_ids(tokenizer)))
    n = int(chosen.sum())
    as_mask = int((chosen & (inputs == tokenizer.token_to_id("[MASK]"))).sum())
    kept = int((chosen & (inputs == blocks)).sum())
    print(f"targets: {n:,} of {int(maskable.sum()):,} maskable tokens = "
          f"{100 * n / int(maskable.sum()):.2f}%")
    print(f"of the targets: [MASK] {100 * as_mask / n:.2f}%, random {100 * (n - as_mask - kept) / n:.2f}%, "
          f"kept {100 * kept / n:.2f}%")
    print(f"special tokens chosen: {int((chosen & ~maskable).sum())}; "
          f"inputs changed outside targets: {int(((inputs != blocks) & ~chosen).sum())}")

    print("== fixed and process-independent ==")
    rows = list(range(8))
    whole = mask(blocks[rows], rows, seed=0, epoch=0)
    again = mask(blocks[rows], rows, seed=0, epoch=0)
    even, odd = rows[0::2], rows[1::2]  # how two ranks might share the same 8 sequences
    rank0, rank1 = mask(blocks[even], even, seed=0, epoch=0), mask(blocks[odd], odd, seed=0, epoch=0)
    print(f"same (seed, epoch, index) -> same masks: {torch.equal(whole[1], again[1])}")
    print(f"split over 2 ranks -> same masks: {torch.equal(whole[1][even], rank0[1]) and torch.equal(whole[1][odd], rank1[1])}")
    next_epoch = mask(blocks[rows], rows, seed=0, epoch=1)
    print(f"next epoch -> new masks: {not torch.equal(whole[1], next_epoch[1])}")

    print("== loss, perplexity, accuracy ==")
    vocab = tokenizer.get_vocab_size()
    print(f"uniform guess over {vocab} word pieces: loss {math.log(vocab):.2f}, perplexity {vocab}")
    eval_blocks = blocks[:args.eval_blocks] if args.eval_blocks else blocks
    eval_indices = list(range(len(eval_blocks)))
    nll, count, correct, batch_means = 0.0, 0, 0, []
    with torch.no_grad():
        for start in range(0, len(eval_blocks), 50):  # batches of 50, 50, ..., the rest
            rows = eval_indices[start:start + 50]
            inputs, labels = mask(eval_blocks[rows], rows, seed=0, epoch=0)
            logits, targets = model.masked_logits(inputs, labels)
            batch_nll = F.cross_entropy(logits, targets, reduction="sum").item()
            nll, count = nll + batch_nll, count + targets.numel()
            correct += int((logits.argmax(-1) == targets).sum())
            batch_means.append(batch_nll / targets.numel())
    loss = nll / count
    print(f"bert-tiny-splade-mlm, first {len(eval_blocks)} test blocks, {count:,} masked tokens:")
    print(f"  loss = sum of NLL / count = {loss:.2f}, perplexity = exp(loss) = {math.exp(loss):.0f}, "
          f"accuracy {100 * correct / count:.1f}%")
    mean_of_means = sum(batch_means) / len(batch_means)
    print(f"  mean of the {len(batch_means)} batch means instead: {mean_of_means:.4f} vs {loss:.4f}")
    result = evaluate(model, eval_blocks.numpy(), mask, seed=0, batch_size=32,
                      device=torch.device("cpu"), precision="fp32")
    print(f"  minibert.evaluate.evaluate (batch 32) agrees: "
          f"{math.isclose(result['eval_loss'], loss, rel_tol=1e-5)}")


if __name__ == "__main__":
    main()
