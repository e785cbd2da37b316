"""Fill-mask latency for one sentence: minibert's fill_mask against transformers.

    python benchmarks/fill_mask.py --threads 2
    python benchmarks/fill_mask.py --checkpoint ../shared/assets/checkpoints/bert-tiny-splade-mlm

For each checkpoint both implementations hold the same weights: minibert reads the folder
(a BertModel checkpoint such as MiniLM gets a freshly initialised head, seeded), and
transformers' BertForMaskedLM is built from minibert's weights through minibert.convert.

Timed per call, alternating, on the same thread count:
- minibert: minibert.fill_mask.fill_mask(model, tokenizer, text, top_k=5), the whole call:
  tokenize, forward, the head at the mask positions, softmax, top-5, decode the 5 sentences.
- transformers: the lean path (tokenizer(text), BertForMaskedLM forward, softmax at the mask
  positions, top-5, decode the 5 sentences), and for reference its fill-mask pipeline.
With six masks minibert's fill_mask fills them one at a time (six forward passes, each mask
seeing the ones filled before it) where transformers' single pass predicts all six at once;
"minibert one pass" is minibert doing transformers' single pass, to compare like with like.

Peak memory of one call, in a fresh process per implementation: the resident-size increase
(median of five calls) and the exact peak of live tensors (benchmarks/README.md). The last
line is the one-mask latency ratio, minibert / transformers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import ASSETS, cpu_step_peak_bytes, cpu_tensor_peak_bytes, interleaved, median
from minibert.checkpoint import read_checkpoint
from minibert.convert import config_to_hf, minibert_to_hf
from minibert.fill_mask import EXAMPLE_SENTENCES, fill_mask, mask_probabilities
from minibert.tokenizer import load_tokenizer

CHECKPOINTS = (ASSETS / "checkpoints" / "bert-tiny-splade-mlm",
               ASSETS / "checkpoints" / "minilm-l6-h384-uncased")
SENTENCES = {"one mask": EXAMPLE_SENTENCES[0], "six masks": EXAMPLE_SENTENCES[1]}
TOP_K = 5


@dataclass
class FillMaskBenchArgs:
    """What to measure; see --help for each field."""

    checkpoints: list[Path] = field(default_factory=lambda: list(CHECKPOINTS))
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    repeats: int = 30  # timed calls per implementation and sentence
    warmup: int = 3
    memory: bool = True  # also measure peak memory
    seed: int = 0  # the head of a checkpoint that has none
    memory_of: str | None = None  # internal: "implementation:checkpoint" to measure, then exit

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("--repeats must be positive and --warmup not negative")
        self.checkpoints = [Path(c) for c in self.checkpoints]
        for folder in self.checkpoints:
            if not folder.is_dir():
                raise ValueError(f"{folder}: no such checkpoint folder")


def load_pair(folder: Path, seed: int):
    """minibert and transformers models with the same weights, and each one's tokenizer."""
    import transformers

    # The seed draws the head that read_checkpoint adds to a BertModel checkpoint.
    minibert, _, _ = read_checkpoint(folder, seed=seed)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**config_to_hf(minibert.config)))
    # A checkpoint's pooler is kept (minibert/convert.py says why); BertForMaskedLM has none.
    state = {name: tensor for name, tensor in minibert_to_hf(minibert.state_dict()).items()
             if not name.startswith("bert.pooler.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # The decoder is tied to the word embeddings (weight) and to cls.predictions.bias.
    if unexpected or set(missing) - {"cls.predictions.decoder.weight",
                                     "cls.predictions.decoder.bias"}:
        raise RuntimeError(f"weights did not line up: missing {missing}, unexpected {unexpected}")
    hf.eval()
    hf_tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
    return minibert, hf, load_tokenizer(folder), hf_tokenizer


def kib(num_bytes: float) -> str:
    return f"{num_bytes / 1024:,.0f} KiB"


def transformers_fill_mask(model, tokenizer, text: str) -> list[list[dict]]:
    """transformers' forward + softmax at the mask positions, top-k and the decoded sentences."""
    with torch.inference_mode():
        inputs = tokenizer(text, return_tensors="pt")
        logits = model(**inputs).logits[0]  # (seq, vocab)
        positions = (inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero()[:, 0]
        scores, token_ids = logits[positions].softmax(dim=-1).topk(TOP_K)  # (masks, k)
    results = []
    for position, mask_scores, mask_ids in zip(positions.tolist(), scores, token_ids):
        ids = inputs["input_ids"][0].clone()
        results.append([])
        for score, token_id in zip(mask_scores.tolist(), mask_ids.tolist()):
            ids[position] = token_id
            results[-1].append({"token_id": token_id, "score": score,
                                "sequence": tokenizer.decode(ids, skip_special_tokens=True)})
    return results


def minibert_one_pass(model, tokenizer, text: str) -> list[list[dict]]:
    """minibert doing what transformers_fill_mask does: every mask from one forward pass."""
    ids = tokenizer.encode(text).ids
    positions = [i for i, t in enumerate(ids) if t == tokenizer.token_to_id("[MASK]")]
    probs = mask_probabilities(model, [ids], [positions], tokenizer.token_to_id("[PAD]"))[0]
    scores, token_ids = probs.topk(TOP_K)  # (masks, k)
    results = []
    for position, mask_scores, mask_ids in zip(positions, scores, token_ids):
        results.append([])
        for score, token_id in zip(mask_scores.tolist(), mask_ids.tolist()):
            filled = ids[:position] + [token_id] + ids[position + 1:]
            results[-1].append({"token_id": token_id, "score": score,
                                "sequence": tokenizer.decode(filled, skip_special_tokens=True)})
    return results


def calls(folder: Path, seed: int, text: str):
    """{name: zero-argument call} for one sentence; the pipeline only for the time table."""
    import transformers

    minibert, hf, tokenizer, hf_tokenizer = load_pair(folder, seed)
    pipeline = transformers.pipeline("fill-mask", model=hf, tokenizer=hf_tokenizer,
                                     top_k=TOP_K)
    return {
        "minibert": lambda: fill_mask(minibert, tokenizer, text, top_k=TOP_K),
        "transformers": lambda: transformers_fill_mask(hf, hf_tokenizer, text),
        "minibert one pass": lambda: minibert_one_pass(minibert, tokenizer, text),
        "transformers pipeline": lambda: pipeline(text),
    }


def check_same_predictions(folder: Path, seed: int) -> str:
    """Both implementations must propose the same tokens, or the timing compares nothing."""
    minibert, hf, tokenizer, hf_tokenizer = load_pair(folder, seed)
    text = SENTENCES["one mask"]
    ours = [p["token_id"] for p in fill_mask(minibert, tokenizer, text, TOP_K)["predictions"]]
    theirs = [p["token_id"] for p in transformers_fill_mask(hf, hf_tokenizer, text)[0]]
    text = SENTENCES["six masks"]
    ours_six = [[p["token_id"] for p in mask] for mask in minibert_one_pass(minibert, tokenizer,
                                                                             text)]
    theirs_six = [[p["token_id"] for p in mask] for mask in transformers_fill_mask(
        hf, hf_tokenizer, text)]
    if ours != theirs or ours_six != theirs_six:
        raise RuntimeError(f"top-{TOP_K} differ: minibert {ours} {ours_six}, "
                           f"transformers {theirs} {theirs_six}")
    return (f"same top-{TOP_K} in one pass for both sentences; for the first: "
            f"{tokenizer.decode(ours)}")


def measure_memory_here(args: FillMaskBenchArgs) -> None:
    """The child process of memory_in_fresh_process: one implementation, one checkpoint."""
    name, folder = args.memory_of.split(":", 1)
    resident, tensors = [], []
    for text in SENTENCES.values():
        call = calls(Path(folder), args.seed, text)[name]
        for _ in range(max(args.warmup, 1)):
            call()
        # A call needs a few MiB, near the resolution of resident-size counting: take the
        # median of five, and count the tensors exactly as well.
        resident.append(int(median([cpu_step_peak_bytes(call) for _ in range(5)])))
        tensors.append(cpu_tensor_peak_bytes(call))
    print(json.dumps({"resident": resident, "tensors": tensors}))


def memory_in_fresh_process(name: str, folder: Path, argv: list[str]) -> dict[str, list[int]]:
    result = subprocess.run([sys.executable, __file__, *argv, "--memory-of", f"{name}:{folder}"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args: FillMaskBenchArgs, argv: list[str]) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        measure_memory_here(args)
        return
    print(f"fill_mask: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"top-{TOP_K}, median of {args.repeats} calls each, alternating")
    one_mask_ratios = []
    for folder in args.checkpoints:
        print(f"\n{folder.name}: {check_same_predictions(folder, args.seed)}")
        print(f"{'latency':12}{'minibert':>12}{'transformers':>14}{'ratio':>8}"
              f"{'minibert one pass':>19}{'transformers pipeline':>23}")
        for label, text in SENTENCES.items():
            seconds = interleaved(calls(folder, args.seed, text), args.repeats, args.warmup,
                                  torch.device("cpu"))
            ms = {name: 1e3 * median(times) for name, times in seconds.items()}
            ratio = ms["minibert"] / ms["transformers"]
            if label == "one mask":
                one_mask_ratios.append(f"{folder.name} {ratio:.2f}x")
            print(f"{label:12}{ms['minibert']:>10.2f}ms{ms['transformers']:>12.2f}ms"
                  f"{ratio:>7.2f}x{ms['minibert one pass']:>17.2f}ms"
                  f"{ms['transformers pipeline']:>21.2f}ms")
        if args.memory:
            names = ("minibert", "minibert one pass", "transformers")
            memory = {name: memory_in_fresh_process(name, folder, argv) for name in names}
            print(f"{'peak memory':12}" + "".join(f"{name:>24}" for name in names)
                  + "   (resident / tensors)")
            for row, label in enumerate(SENTENCES):
                cells = [f"{kib(memory[name]['resident'][row])} / "
                         f"{kib(memory[name]['tensors'][row])}" for name in names]
                print(f"{label:12}" + "".join(f"{cell:>24}" for cell in cells))
    print("latency ratio minibert/transformers, one mask (medians): " + ", ".join(one_mask_ratios))


def parse_args(argv: list[str]) -> FillMaskBenchArgs:
    defaults = FillMaskBenchArgs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", dest="checkpoints", action="append", type=Path,
                        help="a checkpoint folder (repeatable; default: the two shared ones)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurement")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    values = vars(parser.parse_args(argv))
    if values["checkpoints"] is None:
        values["checkpoints"] = list(CHECKPOINTS)
    return FillMaskBenchArgs(**values)


if __name__ == "__main__":
    argv = sys.argv[1:]
    try:
        arguments = parse_args(argv)
    except ValueError as error:
        sys.exit(f"fill_mask.py: error: {error}")
    run(arguments, argv)
