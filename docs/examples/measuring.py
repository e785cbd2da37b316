"""Chapter 6's numbers: masked-LM perplexity and what moves it, a training run's number
reproduced by `python -m minibert.evaluate`, and pseudo-log-likelihood scores.

    python docs/examples/measuring.py                   # assets at ../shared/assets
    python docs/examples/measuring.py --assets PATH --cache-dir DIR
    python docs/examples/measuring.py --trained runs/quickstart/final   # after the quickstart

Part 1 evaluates bert-tiny on the first 64 validation blocks of the Wikipedia sample with
`evaluate_checkpoint`, the function behind the command, changing one setting at a time.
Part 2 trains bert-tiny for 3 steps with `minibert.trainer.train`, as train.py does, and
evaluates its final/ checkpoint with the command's function. Part 3 scores sentences with
`minibert.score`. Everything runs in fp32 on the CPU, in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

from minibert import load_pretrained, load_tokenizer
from minibert.distributed import Launch
from minibert.evaluate import EvaluateArgs, evaluate_checkpoint
from minibert.score import score_sentences
from minibert.train_config import TrainConfig
from minibert.trainer import train

REPO = Path(__file__).resolve().parents[2]

# Minimal pairs in the style of BLiMP (Warstadt et al. 2020): the same sentence, grammatical
# first, with one agreement, tense or word-order error.
PAIRS = (("They were happy to see us.", "They was happy to see us."),
         ("The author of the books is famous.", "The author of the books are famous."),
         ("I can see the house from here.", "I can sees the house from here."),
         ("Who did you see at the party?", "Who did you saw at the party?"),
         ("The cat sat on the mat.", "The cat sat on mat the."),
         ("She has lived in Paris for ten years.", "She have lived in Paris for ten years."),
         ("The children are playing in the garden.", "The children is playing in the garden."),
         ("He went to the store yesterday.", "He go to the store yesterday."),
         ("There are many books on the shelf.", "There is many books on the shelf."),
         ("The dog chased the ball across the park.", "The dog chased ball the across park the."))


def line(result: dict) -> str:
    return (f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
            f"accuracy {result['accuracy']:.4f}")


def ranked_right(model, tokenizer) -> int:
    """In how many of PAIRS the grammatical sentence has the higher PLL."""
    return sum(good["pll"] > bad["pll"]
               for good, bad in (score_sentences(model, tokenizer, pair) for pair in PAIRS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to cache the tokenized blocks (default: a temporary folder)")
    parser.add_argument("--trained", type=Path, default=None,
                        help="also rank the pairs with this checkpoint (runs/quickstart/final)")
    args = parser.parse_args()
    checkpoint = args.assets / "checkpoints" / "bert-tiny-splade-mlm"
    corpus = args.assets / "corpus" / "wikipedia-sample"

    with tempfile.TemporaryDirectory() as temporary:
        cache = str(args.cache_dir or Path(temporary) / "cache")

        print("== perplexity over masked tokens ==")
        base = dict(model=str(checkpoint), data=str(corpus), max_seq_length=128, max_blocks=64,
                    precision="fp32", device="cpu", cache_dir=cache)
        result = evaluate_checkpoint(EvaluateArgs(**base), Launch())
        print(f"bert-tiny, first {result['blocks']} validation blocks of 128 tokens, "
              f"{result['masked_tokens']} masked tokens:")
        print(f"  {'as above':<21} {line(result)}")
        for label, change in (("eval_seed 1", {"eval_seed": 1}),
                              ("mlm_probability 0.3", {"mlm_probability": 0.3}),
                              ("max_seq_length 32", {"max_seq_length": 32, "max_blocks": 256})):
            other = evaluate_checkpoint(EvaluateArgs(**{**base, **change}), Launch())
            print(f"  {label:<21} {line(other)} ({other['masked_tokens']} masked)")

        # configs/quickstart-cpu.toml evaluates 256 blocks before its first step (in bf16).
        start = evaluate_checkpoint(EvaluateArgs(**{**base, "max_blocks": 256}), Launch())
        print(f"the quickstart's step 0, in fp32: {start['blocks']} blocks, {line(start)}")

        print("== a training run's number, reproduced ==")
        data = Path(temporary) / "corpus"
        data.mkdir()
        for split, size in (("train", 24_000), ("valid", 12_000)):
            text = (corpus / f"{split}.txt").read_text(encoding="utf-8")[:size]
            (data / f"{split}.txt").write_text(text.rsplit("\n", 1)[0] + "\n", encoding="utf-8")
        config = TrainConfig(model=str(checkpoint), data=str(data), out_dir=f"{temporary}/run",
                             cache_dir=cache, max_seq_length=128, batch_size=8, max_steps=3,
                             lr=1e-3, warmup_steps=1, precision="fp32", device="cpu",
                             eval_every=0, eval_max_blocks=16, eval_seed=3, save_every=0)
        with contextlib.redirect_stdout(io.StringIO()):  # train.py's own log lines
            summary = train(config, environ={})
        last = summary["evals"][3]
        print("train.py, 3 steps, eval_max_blocks 16, eval_seed 3; its last evaluation line:")
        print(f"  step 3: eval loss {last['eval_loss']:.4f}, perplexity "
              f"{last['eval_perplexity']:.2f}, accuracy {last['eval_accuracy']:.4f}")
        again = evaluate_checkpoint(
            EvaluateArgs(model=f"{temporary}/run/final", data=str(data), max_seq_length=128,
                         max_blocks=16, eval_seed=3, precision="fp32", device="cpu",
                         cache_dir=cache), Launch())
        print("python -m minibert.evaluate --model RUN/final --max_blocks 16 --eval_seed 3 ...:")
        print(f"  {line(again)}")

    print("== pseudo-log-likelihood ==")
    model, tokenizer = load_pretrained(checkpoint), load_tokenizer(checkpoint)
    good, bad = score_sentences(model, tokenizer, PAIRS[0])
    for result in (good, bad):
        print(f"{result['text']:<28} PLL {result['pll']:7.2f}, pseudo-perplexity "
              f"{result['pseudo_perplexity']:.1f}")
        print("  " + " ".join(f"{t['token']} {t['logprob']:.2f}" for t in result["tokens"]))
    print(f"grammatical sentence ranked first in {ranked_right(model, tokenizer)} of "
          f"{len(PAIRS)} pairs")
    if args.trained:
        right = ranked_right(load_pretrained(args.trained), load_tokenizer(args.trained))
        print(f"{args.trained}: grammatical sentence ranked first in {right} of {len(PAIRS)} pairs")

    print("== word-l2r ==")
    text = "The ichthyologist studied the fish."
    plain, l2r = (score_sentences(model, tokenizer, [text], word_l2r=w)[0] for w in (False, True))
    print(f"{text}  PLL {plain['pll']:.2f}, word-l2r {l2r['pll']:.2f}")
    for a, b in zip(plain["tokens"], l2r["tokens"]):
        print(f"  {a['token']:<10} {a['logprob']:7.2f} {b['logprob']:7.2f}")


if __name__ == "__main__":
    main()
