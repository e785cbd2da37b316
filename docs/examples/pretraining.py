"""Chapter 4's numbers on pretraining from scratch.

    python docs/examples/pretraining.py                    # assets at ../shared/assets

Part 1 draws a fresh model of configs/pretrain-cpu.toml's shape from its seed and makes that
run's step-0 evaluation again, in fp32: the sanity rule of pretraining from scratch is that
this loss sits at ln(vocab size), and tests/test_docs.py checks it against the recorded run.
Part 2 trains a tiny fresh model a few steps on the WikiText-2 test split, to show the loss
leaving ln(V). It takes seconds; configs/pretrain-cpu.toml is the real run.
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
from minibert.masking import IGNORE_INDEX, make_masker

REPO = Path(__file__).resolve().parents[2]
PRETRAIN_SHAPE = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                  "intermediate_size": 1024, "max_position_embeddings": 128}
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
              "intermediate_size": 256, "max_position_embeddings": 128,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


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
    by_word = make_masker(tokenizer, vocab_size=vocab_size, whole_word_mask=True)

    with tempfile.TemporaryDirectory() as temporary:
        blocks = load_blocks({"test": args.assets / "corpus" / "wikitext-2-raw" / "wiki.test.raw"},
                             "test", tokenizer, max_seq_length=128,
                             cache_dir=args.cache_dir or temporary, show_progress=False)
        blocks = torch.from_numpy(blocks.copy()).long()

    print("== a fresh model guesses uniformly ==")
    # The step-0 evaluation of configs/pretrain-cpu.toml, as the trainer makes it: the model
    # drawn from seed 0, the first 128 validation blocks, whole-word masks of eval_seed 0,
    # batches of 32; here in fp32 (the run evaluates in bf16).
    with tempfile.TemporaryDirectory() as temporary:
        valid = load_blocks(args.assets / "corpus" / "wikipedia-sample", "validation", tokenizer,
                            max_seq_length=128, cache_dir=args.cache_dir or temporary,
                            show_progress=False)[:128]
    model, _, _ = random_init(vocab_folder, seed=0, overrides=PRETRAIN_SHAPE)
    parameters = sum(p.numel() for p in model.parameters())
    result = evaluate(model, valid, by_word, seed=0, batch_size=32, device=torch.device("cpu"),
                      precision="fp32")
    print(f"configs/pretrain-cpu.toml's model from seed 0: {parameters / 1e6:.1f} M parameters")
    print(f"its step-0 evaluation in fp32 (128 validation blocks): eval loss "
          f"{result['eval_loss']:.4f}; ln(vocab size {vocab_size}) = {math.log(vocab_size):.4f}")

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
