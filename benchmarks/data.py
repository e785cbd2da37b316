"""Tokenize and chunk a corpus: minibert.data.load_blocks against the datasets.map recipe.

    python benchmarks/data.py                        # the Wikipedia sample, then ~100 MB of it
    python benchmarks/data.py --corpus ../shared/assets/corpus/wikitext-2-raw/wiki.test.raw
    python benchmarks/data.py --large-mb 0           # the small corpus only (half a minute)
    python benchmarks/data.py --compare-with ../main # also minibert as another tree has it

Both turn the corpus into blocks of --max-seq-length tokens with the same WordPiece vocabulary:
- minibert: load_tokenizer(folder), then minibert.data.load_blocks (read, tokenize, cut into
  [CLS] 126 tokens [SEP] and append to a .npy a chunk at a time, return it memory-mapped);
- transformers: the recipe of transformers' examples/pytorch/language-modeling/run_mlm.py,
  BertTokenizerFast.from_pretrained(folder), datasets.load_dataset("text", ...),
  .map(tokenize_function, batched=True) and .map(group_texts, batched=True); on the large
  corpus both maps with num_proc=--num-proc (2), as run_mlm.py's --preprocessing_num_workers.
Two rows: --corpus as it is, then a large corpus of about --large-mb MB made by repeating
--corpus in a temporary folder (whole copies, or a prefix cut at a line end when it is less
than one copy).

"Cold" is the first run with an empty cache folder; "warm" the same call again, which both
answer from their caches. Each run is a fresh process (imports not timed), the
implementations alternating; the table shows medians. Memory, per run:
- "peak": the highest resident size of the process during the cold run, imports included
  (the kernel's VmHWM, reset through /proc/self/clear_refs just before it): what the machine
  must hold for one build;
- "increase": the same above the resident size after the imports;
- "all processes": the largest sum, over the process and every process it started (datasets'
  map workers), of the proportional set size (PSS: a page shared by n processes counts 1/n),
  sampled every 0.1 s from /proc over the whole run, imports and warm run included.
The environment of every run is this one's, except TOKENIZERS_PARALLELISM, removed, so that
each library uses the cores as it does by default. The last line of each row is the ratio of
cold times, transformers / minibert.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from common import ASSETS, median, mib

CORPUS = ASSETS / "corpus" / "wikipedia-sample" / "train.txt"
TOKENIZER = ASSETS / "tokenizer" / "bert-base-uncased"
IMPLEMENTATIONS = ("minibert", "transformers")
SAMPLE_SECONDS = 0.1


@dataclass
class DataBenchArgs:
    """What to measure; see --help for each field."""

    corpus: Path = CORPUS  # a text file, one paragraph a line
    tokenizer: Path = TOKENIZER  # a folder with vocab.txt
    max_seq_length: int = 128  # tokens per block
    repeats: int = 3  # fresh-process runs per implementation on --corpus
    large_mb: float = 100.0  # size of the large corpus (repeats of --corpus); 0: no large row
    large_repeats: int = 1  # fresh-process runs per implementation on the large corpus
    num_proc: int = 2  # processes of datasets' map on the large corpus
    compare_with: Path | None = None  # another minibert source tree to run as well
    run_one: str | None = None  # internal: run this implementation once, print JSON, exit
    map_processes: int | None = None  # internal: num_proc of this run's maps

    def __post_init__(self) -> None:
        self.corpus, self.tokenizer = Path(self.corpus), Path(self.tokenizer)
        if not self.corpus.is_file():
            raise ValueError(f"{self.corpus}: no such file")
        if not (self.tokenizer / "vocab.txt").is_file():
            raise ValueError(f"{self.tokenizer}: no vocab.txt")
        if self.repeats < 1 or self.large_repeats < 1 or self.max_seq_length < 3:
            raise ValueError("--repeats and --large-repeats must be positive, --max-seq-length "
                             "at least 3")
        if self.large_mb < 0 or self.num_proc < 1:
            raise ValueError("--large-mb must be >= 0, --num-proc >= 1")
        if self.compare_with is not None:
            self.compare_with = Path(self.compare_with).resolve()
            if not (self.compare_with / "minibert" / "data.py").is_file():
                raise ValueError(f"{self.compare_with}: no minibert/data.py")


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

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"],
                        num_proc=args.map_processes)
    grouped = tokenized.map(group_texts, batched=True, num_proc=args.map_processes)
    return grouped["train"].num_rows


def run_one(args: DataBenchArgs) -> None:
    """The child process: import, then a cold and a warm run in a fresh cache folder."""
    name = args.run_one.split("@")[0]
    build = {"minibert": minibert_blocks, "transformers": transformers_blocks}[name]
    if name == "minibert":
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
        peak = proc_status_kib("VmHWM")
        start = time.perf_counter()
        build(args, Path(cache_dir))
        warm = time.perf_counter() - start
    print(json.dumps({"cold_s": cold, "warm_s": warm, "blocks": blocks,
                      "peak_bytes": (peak - before) * 1024, "peak_total_bytes": peak * 1024}))


# --- memory of a process and its children ------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def proportional_set_kib(pid: int) -> int:
    """A process's PSS in KiB (0 once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


class TreeMemory:
    """The highest PSS sum of a process tree, sampled in a thread while the process runs."""

    def __init__(self, root: int):
        self.root, self.peak_kib = root, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            total = sum(proportional_set_kib(pid) for pid in process_tree(self.root))
            self.peak_kib = max(self.peak_kib, total)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak_kib * 1024


def in_fresh_process(name: str, argv: list[str], compare_with: Path | None) -> dict:
    # Both libraries must stay off the network: the recipe needs no download.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    if "@" in name:  # minibert from another source tree
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(compare_with),
                                                          env.get("PYTHONPATH")]))
    child = subprocess.Popen([sys.executable, __file__, *argv, "--run-one", name], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(child.pid)
    stdout, stderr = child.communicate()
    tree_peak = memory.stop()
    if child.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "tree_peak_bytes": tree_peak}


def make_large_corpus(source: Path, megabytes: float, folder: Path) -> Path:
    """About `megabytes` MB of `source` repeated: whole copies (rounded up), or a prefix cut at
    a line end when that is less than one copy."""
    text, target = source.read_bytes(), int(megabytes * 1e6)
    path = folder / "train.txt"
    if target >= len(text):
        with open(path, "wb") as file:
            for _ in range(math.ceil(target / len(text))):
                file.write(text)
    else:
        cut = text.rfind(b"\n", 0, target) + 1
        path.write_bytes(text[:cut or target])
    return path


def measure(args: DataBenchArgs, argv: list[str], corpus: Path, repeats: int,
            map_processes: int | None) -> None:
    """Print one table: every implementation on `corpus`, alternating, medians."""
    names = list(IMPLEMENTATIONS)
    if args.compare_with:
        names.insert(1, f"minibert@{args.compare_with.name}")
    extra = ["--corpus", str(corpus)] + (["--map-processes", str(map_processes)]
                                         if map_processes else [])
    size = corpus.stat().st_size
    print(f"data: {corpus} ({size / 1e6:.1f} MB), blocks of {args.max_seq_length} tokens, "
          f"vocabulary {args.tokenizer.name}, {os.cpu_count()} cores, map num_proc "
          f"{map_processes or 'none'}, medians of {repeats} fresh processes each, alternating; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            runs[name].append(in_fresh_process(name, argv + extra, args.compare_with))
    print(f"{'':22}{'cold s':>8}{'MB/s':>7}{'warm s':>8}{'blocks':>9}{'peak':>11}"
          f"{'increase':>11}{'all processes':>15}")
    cold = {}
    for name in names:
        cold[name] = median([r["cold_s"] for r in runs[name]])
        warm = median([r["warm_s"] for r in runs[name]])
        row = [median([r[key] for r in runs[name]])
               for key in ("peak_total_bytes", "peak_bytes", "tree_peak_bytes")]
        print(f"{name:22}{cold[name]:>8.2f}{size / 1e6 / cold[name]:>7.2f}{warm:>8.3f}"
              f"{runs[name][0]['blocks']:>9}{mib(row[0]):>11}{mib(row[1]):>11}{mib(row[2]):>15}")
    print(f"speed-up minibert vs datasets.map recipe, cold (medians): "
          f"{cold['transformers'] / cold['minibert']:.2f}x; load average "
          f"{os.getloadavg()[0]:.1f} at the end")


def run(args: DataBenchArgs, argv: list[str]) -> None:
    if args.run_one:
        run_one(args)
        return
    measure(args, argv, args.corpus, args.repeats, None)
    if args.large_mb:
        with tempfile.TemporaryDirectory() as folder:
            large = make_large_corpus(args.corpus, args.large_mb, Path(folder))
            print()
            measure(args, argv, large, args.large_repeats, args.num_proc)


def parse_args(argv: list[str]) -> DataBenchArgs:
    defaults = DataBenchArgs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=defaults.corpus)
    parser.add_argument("--tokenizer", type=Path, default=defaults.tokenizer,
                        help="folder with vocab.txt")
    parser.add_argument("--max-seq-length", type=int, default=defaults.max_seq_length)
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="fresh-process runs per implementation on --corpus")
    parser.add_argument("--large-mb", type=float, default=defaults.large_mb,
                        help="size in MB of the large corpus, --corpus repeated (0: no large "
                             "row; default %(default)s)")
    parser.add_argument("--large-repeats", type=int, default=defaults.large_repeats,
                        help="fresh-process runs per implementation on the large corpus")
    parser.add_argument("--num-proc", type=int, default=defaults.num_proc,
                        help="processes of datasets' map on the large corpus")
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="also run minibert from this source tree (a checkout with "
                             "minibert/), e.g. the previous version")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--map-processes", type=int, help=argparse.SUPPRESS)
    return DataBenchArgs(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    argv = sys.argv[1:]
    try:
        arguments = parse_args(argv)
    except ValueError as error:
        sys.exit(f"data.py: error: {error}")
    run(arguments, argv)
