"""Draw the loss curves of the two recorded runs, docs/images/quickstart_loss.png and
docs/images/pretrain_loss.png, from their metrics.jsonl in docs/runs/.

    python docs/examples/loss_curves.py                     # assets at ../shared/assets
    python docs/examples/loss_curves.py --images /tmp/pictures --cache-dir DIR

The runs themselves take minutes (docs/runs/README.md says how they were made); their
metrics.jsonl files are what they wrote. The quickstart's picture says why its evaluation
loss sits below its training loss. The pretraining run's picture adds the two levels the
chapter reads it against: ln(vocabulary size), where a fresh model starts, and the loss of
guessing every target by how frequent its word piece is in the training split, whatever the
context, computed here on the run's own evaluation targets (its first 128 validation blocks,
whole-word masks of eval_seed 0).
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

from minibert import load_tokenizer  # noqa: E402
from minibert.data import load_blocks  # noqa: E402
from minibert.evaluate import EVAL_EPOCH  # noqa: E402
from minibert.masking import IGNORE_INDEX, make_masker  # noqa: E402
from minibert.plot import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "docs" / "runs"


def curves(ax, records: list[dict]) -> None:
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    ax.plot(*zip(*train), color="C0", label="train loss (mean of the last 10 steps)")
    ax.plot(*zip(*evals), "o--", color="C1", label="evaluation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-LM loss (nats per target)")
    ax.grid(alpha=0.3)


def frequency_plateau(assets: Path, cache_dir: Path) -> float:
    """Loss of guessing each evaluation target of configs/pretrain-cpu.toml by its piece's
    frequency in the training split (add-one smoothing), whatever the context."""
    tokenizer = load_tokenizer(assets / "tokenizer" / "bert-base-uncased")
    corpus = assets / "corpus" / "wikipedia-sample"
    train, valid = (torch.from_numpy(load_blocks(corpus, split, tokenizer, max_seq_length=128,
                                                 cache_dir=cache_dir, show_progress=False)
                                     .astype("int64"))
                    for split in ("train", "validation"))
    vocab_size = tokenizer.get_vocab_size()
    counts = torch.bincount(train[:, 1:-1].reshape(-1), minlength=vocab_size)  # no [CLS]/[SEP]
    frequency = (counts.double() + 1) / (counts.sum() + vocab_size)
    mask = make_masker(tokenizer, vocab_size=vocab_size, whole_word_mask=True)
    _, labels = mask(valid[:128], range(128), seed=0, epoch=EVAL_EPOCH)
    targets = labels[labels != IGNORE_INDEX]
    print(f"the pretraining run's {len(targets):,} evaluation targets, each guessed by its "
          f"piece's frequency in the training split: loss {-frequency[targets].log().mean():.2f}")
    the = (targets == tokenizer.token_to_id("the")).double().mean()
    print(f"the most frequent piece, 'the', is {100 * the:.1f}% of them: the accuracy of a model "
          f"that always answers 'the'")
    return float(-frequency[targets].log().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to cache the tokenized blocks (default: a temporary folder)")
    parser.add_argument("--images", type=Path, default=REPO / "docs" / "images",
                        help="where to write the pictures (default docs/images)")
    args = parser.parse_args()
    args.images.mkdir(parents=True, exist_ok=True)

    records = read_metrics(RUNS / "quickstart")
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    curves(ax, records)
    ax.set_title("configs/quickstart-cpu.toml: bert-tiny fine-tuned with masked-LM, 80 steps")
    ax.text(0.97, 0.62, "Why is evaluation below training?\n"
            "a train point is the mean of the 10 steps before it,\n"
            "taken with dropout on, by a model that was still\n"
            "improving; an evaluation point is the model after\n"
            "the last of those steps, with dropout off.",
            transform=ax.transAxes, ha="right", va="center", multialignment="left", fontsize=9,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9, "edgecolor": "0.8"})
    ax.legend(loc="upper right")
    fig.savefig(args.images / "quickstart_loss.png", dpi=100)
    last = records[-1]
    print(f"quickstart_loss.png: step {last['step']}, train loss {last['train_loss']:.4f}, "
          f"eval loss {last['eval_loss']:.4f}")

    records = read_metrics(RUNS / "pretrain-cpu")
    with tempfile.TemporaryDirectory() as temporary:
        plateau = frequency_plateau(args.assets, args.cache_dir or Path(temporary))
    vocab_size = 30522
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    curves(ax, records)
    ax.axhline(math.log(vocab_size), color="grey", linestyle=":", linewidth=1.2)
    ax.text(records[-1]["step"], math.log(vocab_size) - 0.08,
            f"ln({vocab_size:,}) = {math.log(vocab_size):.2f}: a uniform guess", ha="right",
            va="top", fontsize=9, color="grey")
    ax.axhline(plateau, color="C2", linestyle=":", linewidth=1.2)
    ax.text(records[-1]["step"], plateau + 0.08,
            f"{plateau:.2f}: each target guessed by its piece's frequency", ha="right",
            va="bottom", fontsize=9, color="C2")
    ax.set_title("configs/pretrain-cpu.toml: a 4-layer BERT from BERT's initialisation")
    ax.legend(loc="center right")
    fig.savefig(args.images / "pretrain_loss.png", dpi=100)
    last = records[-1]
    print(f"pretrain_loss.png: step {last['step']}, train loss {last['train_loss']:.4f}, "
          f"eval loss {last['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
