"""Tokenize and chunk a corpus: minibert.data.load_blocks against the datasets.map recipe.

    python benchmarks/data.py
    python benchmarks/data.py --corpus ../shared/assets/corpus/wikitext-2-raw/wiki.test.raw

Both turn the Wikipedia sample into blocks of --max-seq-length tokens with the same WordPiece
vocabulary:
- minibert: load_tokenizer(folder), then minibert.data.load_blocks (tokenize every line,
  concatenate, cut into [CLS] 126 tokens [SEP], save as .npy, return it memory-mapped);
- transformers: the recipe of transformers' examples/pytorch/language-modeling/run_mlm.py,
  BertTokenizerFast.from_pretrained(folder), datasets.load_dataset("text", ...),
  .map(tokenize_function, batched=True) and .map(group_texts, batched=True).
"Cold" is the first run with an empty cache folder; "warm" the same call again, which both
answer from their caches. Each run is a fresh process (imports not timed), the two
implementations alternating; the table shows medians. Peak memory is the resident-size
increase of the cold run above the process after its imports. The last line is the ratio of
cold times, transformers / minibert (how many times faster minibert is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from common import ASSETS, median, mib

CORPUS = ASSETS / "corpus" / "wikipedia-sample" / "train.txt"
TOKENIZER = ASSETS / "tokenizer" / "bert-base-uncased"
IMPLEMENTATIONS = ("minibert", "transformers")


@dataclass
class DataBenchArgs:
    """What to measure; see --help for each field."""

    corpus: Path = CORPUS  # a text file, one paragraph a line
    tokenizer: Path = TOKENIZER  # a folder with vocab.txt
    max_seq_length: int = 128  # tokens per block
    repeats: int = 3  # fresh-process runs per implementation
    run_one: str | None = None  # internal: run this implementation once, print JSON, exit

    def __post_init__(self) -> None:
        self.corpus, self.tokenizer = Path(self.corpus), Path(self.tokenizer)
        if not self.corpus.is_file():
            raise ValueError(f"{self.corpus}: no such file")
        if not (self.tokenizer / "vocab.txt").is_file():
            raise ValueError(f"{self.tokenizer}: no vocab.txt")
        if self.repeats < 1 or self.max_seq_length < 3:
            raise ValueError("--repeats must be positive, --max-seq-length at least 3")


def minibert_blocks(args: DataBenchArgs, cache_dir: Path) -> int:
    from minibert.data import load_blocks
    from minibert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    blocks = load_blocks({"train": args.corpus}, "train", tokenizer, args.max_seq_length,
                         cache_dir, show_progress=False)
    return len(blocks)


def transformers_blocks(args: DataBenchArgs, cache_dir: Path) -> int:
    """run_mlm.py's recipe (without --line_by_line), as people copy it."""
    import datasets
    import transformers

    tokenizer = transformers.BertTokenizerFast.from_pretrained(args.tokenizer)
    raw = datasets.load_dataset("text", data_files={"train": str(args.corpus)},
                                cache_dir=str(cache_dir))

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // args.max_seq_length) * args.max_seq_length
        return {k: [t[i:i + args.max_seq_length]
                    for i in range(0, total_length, args.max_seq_length)]
                for k, t in concatenated.items()}

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True)
    return grouped["train"].num_rows


def run_one(args: DataBenchArgs) -> None:
    """The child process: import, then a cold and a warm run in a fresh cache folder."""
    build = {"minibert": minibert_blocks, "transformers": transformers_blocks}[args.run_one]
    if args.run_one == "minibert":
        import minibert.data  # noqa: F401  (imports are not timed)
    else:
        import datasets
        import transformers  # noqa: F401
        datasets.disable_progress_bars()
    from common import proc_status_kib

    with tempfile.TemporaryDirectory() as cache_dir:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
        before = proc_status_kib("VmRSS")
        start = time.perf_counter()
        blocks = build(args, Path(cache_dir))
        cold = time.perf_counter() - start
        peak = (proc_status_kib("VmHWM") - before) * 1024
        start = time.perf_counter()
        build(args, Path(cache_dir))
        warm = time.perf_counter() - start
    print(json.dumps({"cold_s": cold, "warm_s": warm, "blocks": blocks, "peak_bytes": peak}))


def in_fresh_process(name: str, argv: list[str]) -> dict:
    # Both libraries must stay off the network: the recipe needs no download.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, __file__, *argv, "--run-one", name], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args: DataBenchArgs, argv: list[str]) -> None:
    if args.run_one:
        run_one(args)
        return
    size = args.corpus.stat().st_size
    print(f"data: {args.corpus} ({size / 1e6:.1f} MB), blocks of {args.max_seq_length} tokens, "
          f"vocabulary {args.tokenizer.name}, {os.cpu_count()} cores, medians of "
          f"{args.repeats} fresh processes each, alternating")
    runs: dict[str, list[dict]] = {name: [] for name in IMPLEMENTATIONS}
    for i in range(args.repeats):
        for name in IMPLEMENTATIONS if i % 2 == 0 else IMPLEMENTATIONS[::-1]:
            runs[name].append(in_fresh_process(name, argv))
    print(f"{'':14}{'cold s':>9}{'warm s':>9}{'blocks':>8}{'peak memory':>13}")
    cold = {}
    for name in IMPLEMENTATIONS:
        cold[name] = median([r["cold_s"] for r in runs[name]])
        warm = median([r["warm_s"] for r in runs[name]])
        peak = median([r["peak_bytes"] for r in runs[name]])
        print(f"{name:14}{cold[name]:>9.3f}{warm:>9.3f}{runs[name][0]['blocks']:>8}"
              f"{mib(peak):>13}")
    print(f"speed-up minibert vs datasets.map recipe, cold (medians): "
          f"{cold['transformers'] / cold['minibert']:.2f}x")


def parse_args(argv: list[str]) -> DataBenchArgs:
    defaults = DataBenchArgs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=defaults.corpus)
    parser.add_argument("--tokenizer", type=Path, default=defaults.tokenizer,
                        help="folder with vocab.txt")
    parser.add_argument("--max-seq-length", type=int, default=defaults.max_seq_length)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--run-one", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    return DataBenchArgs(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    argv = sys.argv[1:]
    try:
        arguments = parse_args(argv)
    except ValueError as error:
        sys.exit(f"data.py: error: {error}")
    run(arguments, argv)
