"""Chapter 2's numbers on whole-word masking and on pretraining from scratch.

    python docs/examples/pretraining.py                    # assets at ../shared/assets

Part 1 masks a sentence, then the whole WikiText-2 test split, token by token and by whole
words (minibert.masking, exactly as training masks them) and counts the words cut in two.
Part 2 draws a fresh model of configs/pretrain-cpu.toml's shape from its seed and checks the
sanity rule of pretraining from scratch: its loss sits at ln(vocab size). Part 3 trains a
tiny fresh model a few steps on the test split, to show the loss leaving ln(V). It takes
seconds; configs/pretrain-cpu.toml is the real run.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from minibert import load_tokenizer
from minibert.checkpoint import random_init
from minibert.data import load_blocks
from minibert.evaluate import evaluate
from minibert.masking import IGNORE_INDEX, make_masker, special_token_ids, word_starts

REPO = Path(__file__).resolve().parents[2]
SENTENCE = "The unbelievably talkative ornithologist misidentified a woodpecker."
PRETRAIN_SHAPE = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                  "intermediate_size": 1024, "max_position_embeddings": 128}
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
              "intermediate_size": 256, "max_position_embeddings": 128,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def words_cut(input_ids: torch.Tensor, labels: torch.Tensor, starts: torch.Tensor) -> int:
    """How many words have some but not all of their pieces chosen as targets."""
    words = starts.long().cumsum(dim=-1) - 1  # (batch, seq) word index of each piece
    count = 0
    for row in range(len(input_ids)):
        pieces = torch.bincount(words[row])
        chosen = torch.bincount(words[row], weights=(labels[row] != IGNORE_INDEX).double())
        count += int(((chosen > 0) & (chosen < pieces)).sum())
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to cache the tokenized blocks (default: a temporary folder)")
    args = parser.parse_args()
    vocab_folder = args.assets / "tokenizer" / "bert-base-uncased"  # vocab.txt alone
    tokenizer = load_tokenizer(vocab_folder)
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
    with tempfile.TemporaryDirectory() as temporary:
        blocks = load_blocks({"test": args.assets / "corpus" / "wikitext-2-raw" / "wiki.test.raw"},
                             "test", tokenizer, max_seq_length=128,
                             cache_dir=args.cache_dir or temporary, show_progress=False)
        blocks = torch.from_numpy(blocks.copy()).long()
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

    print("== a fresh model guesses uniformly ==")
    model, _, _ = random_init(vocab_folder, seed=0, overrides=PRETRAIN_SHAPE)
    parameters = sum(p.numel() for p in model.parameters())
    result = evaluate(model, blocks[:32].numpy(), by_word, seed=0, batch_size=32,
                      device=torch.device("cpu"), precision="fp32")
    print(f"configs/pretrain-cpu.toml's shape, seed 0: {parameters / 1e6:.1f} M parameters")
    print(f"step-0 eval loss {result['eval_loss']:.2f} on 32 blocks; ln(vocab size {vocab_size})"
          f" = {math.log(vocab_size):.2f}")

    print("== a tiny fresh model, a few steps ==")
    model, _, _ = random_init(vocab_folder, seed=0, overrides=TINY_SHAPE)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.98), eps=1e-6)
    train_rows = torch.arange(32, len(blocks))  # the first 32 blocks stay for evaluation
    order = train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(0))]
    losses = []
    for step in range(20):
        rows = order[step * 8:(step + 1) * 8].tolist()
        inputs, labels = by_word(blocks[rows], rows, seed=0, epoch=0)
        loss = model(inputs, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print("train loss at steps 1, 5, 10, 15, 20: " + " ".join(
        f"{losses[i - 1]:.2f}" for i in (1, 5, 10, 15, 20)))
    result = evaluate(model, blocks[:32].numpy(), by_word, seed=0, batch_size=32,
                      device=torch.device("cpu"), precision="fp32")
    print(f"eval loss after 20 steps of 8 blocks: {result['eval_loss']:.2f}")
    # The first plateau of pretraining: guessing every target by how frequent its piece is in
    # the training blocks (add-one smoothing), whatever the context.
    counts = torch.bincount(blocks[train_rows][:, 1:-1].reshape(-1), minlength=vocab_size)
    frequency = (counts.double() + 1) / (counts.sum() + vocab_size)
    _, labels = by_word(blocks[:32], range(32), seed=0, epoch=0)
    targets = labels[labels != IGNORE_INDEX]
    print(f"guessing each target by its piece's frequency, same targets: loss "
          f"{-frequency[targets].log().mean().item():.2f}")

if __name__ == "__main__":
    main()
