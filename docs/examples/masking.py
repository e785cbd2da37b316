"""Chapter 2's numbers: blocks, masks, labels, the perplexity of a real checkpoint, and
whole-word masking.

    python docs/examples/masking.py                         # assets at ../shared/assets
    python docs/examples/masking.py --assets PATH --eval-blocks 0   # 0: the whole test split
    python docs/examples/masking.py --mask-ratio 1.0 --random-ratio 0  # every target [MASK]

It cuts the real WikiText-2 test split into 128-token blocks with minibert.data, masks them with
minibert.masking exactly as training and evaluation do, and measures bert-tiny's masked-LM
loss, perplexity and accuracy with `minibert.evaluate.evaluate`, the trainer's own. Then it
masks a sentence and the whole split by whole words, and counts the words cut in two. It draws
docs/images/masking_80_10_10.png (block 0's first 64 tokens as the model sees them, the
targets coloured by what happened to them) and docs/images/whole_word_masking.png (one
sentence masked token by token and by whole words, as printed).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minibert import load_pretrained, load_tokenizer  # noqa: E402
from minibert.data import corpus_stats, load_blocks  # noqa: E402
from minibert.masking import (IGNORE_INDEX, make_masker, mask_batch,  # noqa: E402
                              special_token_ids, word_starts)
from minibert.evaluate import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SENTENCE = "The unbelievably talkative ornithologist misidentified a woodpecker."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to cache the tokenized blocks (default: a temporary folder)")
    parser.add_argument("--eval-blocks", type=int, default=128,
                        help="evaluate on the first N test blocks (0: all of them)")
    parser.add_argument("--mask-ratio", type=float, default=0.8,
                        help="share of the targets replaced by [MASK] (0.8)")
    parser.add_argument("--random-ratio", type=float, default=0.1,
                        help="share of the targets replaced by a random token (0.1)")
    parser.add_argument("--images", type=Path, default=REPO / "docs" / "images",
                        help="where to write the two pictures (default docs/images)")
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
                          mask_ratio=args.mask_ratio, random_ratio=args.random_ratio,
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

    kinds = ["" if p not in targets else "[MASK]" if inputs[p] == tokenizer.token_to_id("[MASK]")
             else "kept" if inputs[p] == original[p] else "random" for p in range(64)]
    draw_strips(args.images / "masking_80_10_10.png",
                "WikiText-2 test, block 0, first 64 tokens: the input the model sees, and under "
                "each target the label it must predict",
                [[tokenizer.id_to_token(int(i)) for i in inputs[:64]]], [kinds], width=16,
                labels_to_predict=[[tokenizer.id_to_token(int(i)) for i in original[:64]]])
    draw_whole_words(tokenizer, args.images / "whole_word_masking.png")

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

    whole_word_masking(tokenizer, blocks)


def whole_word_masking(tokenizer, blocks: torch.Tensor) -> None:
    """Chapter 2.6: one sentence, then the whole test split, masked token by token and by whole
    words (minibert.masking, exactly as training masks them); the words cut in two counted."""
    vocab_size = tokenizer.get_vocab_size()
    by_token = make_masker(tokenizer, vocab_size=vocab_size)
    by_word = make_masker(tokenizer, vocab_size=vocab_size, whole_word_mask=True)
    print("== one sentence, masked two ways ==")
    encoding = tokenizer.encode(SENTENCE)
    ids = torch.tensor([encoding.ids])
    print("pieces:      " + " ".join(encoding.tokens[1:-1]))
    for name, mask in (("token-level", by_token), ("whole-word", by_word)):
        inputs, labels = mask(ids, [0], seed=10, epoch=0)
        chosen = (labels[0] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        print(f"{name + ':':<12} " + " ".join(tokenizer.id_to_token(int(i))
                                               for i in inputs[0, 1:-1]))
        print(f"{'':<12} targets: " + " ".join(encoding.tokens[p] for p in chosen))

    print("== the WikiText-2 test split, masked two ways ==")
    starts = word_starts(tokenizer, blocks)
    maskable = ~torch.isin(blocks, torch.tensor(special_token_ids(tokenizer)))
    print(f"{len(blocks)} blocks, {int(maskable.sum()):,} maskable pieces, "
          f"{int((starts & maskable).sum()):,} words")
    for name, mask in (("token-level", by_token), ("whole-word", by_word)):
        inputs, labels = mask(blocks, range(len(blocks)), seed=0, epoch=0)
        chosen = labels != IGNORE_INDEX
        n = int(chosen.sum())
        as_mask = int((inputs[chosen] == tokenizer.token_to_id("[MASK]")).sum())
        kept = int((inputs[chosen] == blocks[chosen]).sum())
        print(f"{name}: targets {100 * n / int(maskable.sum()):.2f}% of the pieces; [MASK] "
              f"{100 * as_mask / n:.1f}%, random {100 * (n - as_mask - kept) / n:.1f}%, kept "
              f"{100 * kept / n:.1f}%; words cut in two: {words_cut(blocks, labels, starts):,}")



def words_cut(input_ids: torch.Tensor, labels: torch.Tensor, starts: torch.Tensor) -> int:
    """How many words have some but not all of their pieces chosen as targets."""
    words = starts.long().cumsum(dim=-1) - 1  # (batch, seq) word index of each piece
    count = 0
    for row in range(len(input_ids)):
        pieces = torch.bincount(words[row])
        chosen = torch.bincount(words[row], weights=(labels[row] != IGNORE_INDEX).double())
        count += int(((chosen > 0) & (chosen < pieces)).sum())
    return count


COLOURS = {"": "#eeeeee", "[MASK]": "#e45756", "random": "#f2a541", "kept": "#54a24b"}


def draw_strips(out: Path, title: str, rows: list[list[str]], kinds: list[list[str]],
                width: int, labels: list[str] | None = None,
                labels_to_predict: list[list[str]] | None = None) -> None:
    """Token strips: each token a box, wrapped every `width` tokens, coloured by what the
    masking did to it (not a target, [MASK], random, kept); under a target, optionally, the
    original token, its label."""
    lines = [(r, start) for r in range(len(rows)) for start in range(0, len(rows[r]), width)]
    fig, ax = plt.subplots(figsize=(width * 0.95, 0.62 * len(lines) + 1.1))
    for y, (r, start) in enumerate(lines):
        for x, (token, kind) in enumerate(zip(rows[r][start:start + width],
                                              kinds[r][start:start + width])):
            ax.add_patch(plt.Rectangle((x + 0.04, -y - 0.42), 0.92, 0.84, color=COLOURS[kind]))
            if kind and labels_to_predict:
                ax.text(x + 0.5, -y + 0.13, token, ha="center", va="center", fontsize=9)
                ax.text(x + 0.5, -y - 0.22, f"label: {labels_to_predict[r][start + x]}",
                        ha="center", va="center", fontsize=7)
            else:
                ax.text(x + 0.5, -y, token, ha="center", va="center", fontsize=9)
        if labels and start == 0:
            ax.text(-0.1, -y, labels[r], ha="right", va="center", fontsize=10)
    ax.set_xlim(-3.2 if labels else 0, width)
    ax.set_ylim(-len(lines) + 0.4, 0.6)
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k in COLOURS]
    ax.legend(handles, ["not a target", "target -> [MASK]", "target -> random token",
                        "target, kept"], ncol=4, loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(title, pad=28)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out.name}: " + ", ".join(
        f"{sum(k == kind for row in kinds for k in row)} {kind or 'not a target'}"
        for kind in COLOURS))


def draw_whole_words(tokenizer, out: Path) -> None:
    """docs/examples/pretraining.py's sentence, masked both ways with the same seed."""
    encoding = tokenizer.encode(SENTENCE)
    ids = torch.tensor([encoding.ids])
    rows, kinds = [], []
    for whole_word_mask in (False, True):
        masker = make_masker(tokenizer, vocab_size=tokenizer.get_vocab_size(),
                             whole_word_mask=whole_word_mask)
        inputs, labels = masker(ids, [0], seed=10, epoch=0)
        rows.append(encoding.tokens[1:-1])  # the pieces; the colour says what happened
        kinds.append(["" if labels[0, p] == IGNORE_INDEX
                      else "[MASK]" if inputs[0, p] == tokenizer.token_to_id("[MASK]")
                      else "kept" if inputs[0, p] == ids[0, p] else "random"
                      for p in range(1, ids.shape[1] - 1)])
    draw_strips(out, "one sentence, its targets chosen by token and by whole word",
                rows, kinds, width=len(rows[0]), labels=["token-level", "whole-word"])


if __name__ == "__main__":
    main()
