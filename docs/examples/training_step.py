"""Chapter 5's numbers: why one optimizer step divides by the step's masked-token count, and
why fp16 needs a GradScaler.

    python docs/examples/training_step.py                   # assets at ../shared/assets

Part 1 computes real gradients of bert-tiny (dropout off, fp32) on four WikiText-2 blocks in
the ways a training step can be cut: one batch of 4; 2 micro-batches of 2 accumulated; 2
"ranks" of 2 whose gradients are averaged as DDP averages them. It uses the loss that
minibert/trainer.py backpropagates, sum of NLL x world_size / (masked tokens of the whole
step), and compares it with the mean of per-micro-batch means. No process group is started:
the averaging that DDP's all-reduce performs is written out, so the arithmetic is visible.
Part 2 shows what fp16's range does to small gradients. Part 3 shows which operations CPU
autocast leaves in bf16: on a GPU, autocast runs softmax and layer_norm in fp32; on a CPU, this
torch returns them in bf16 for bf16 inputs.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from minibert import load_pretrained, load_tokenizer
from minibert.data import load_blocks
from minibert.masking import IGNORE_INDEX, mask_batch, special_token_ids

REPO = Path(__file__).resolve().parents[2]


def gradient(model, pieces) -> torch.Tensor:
    """Accumulate backward() over pieces [(inputs, labels, scale)] of loss = scale * sum NLL;
    return the flattened gradient."""
    model.zero_grad(set_to_none=True)
    for inputs, labels, scale in pieces:
        (model(inputs, labels=labels, reduction="sum") * scale).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def report(model, inputs, labels, what: str) -> None:
    counts = [int((labels[i:i + 2] != IGNORE_INDEX).sum()) for i in (0, 2)]
    n = sum(counts)
    print(f"{what}: masked tokens per pair of blocks {counts}, step total {n}")
    reference = gradient(model, [(inputs, labels, 1 / n)])  # one batch of 4: mean over n
    a, b = (inputs[:2], labels[:2]), (inputs[2:], labels[2:])
    accumulated = gradient(model, [(*a, 1 / n), (*b, 1 / n)])  # grad_accum 2, global count
    # Two ranks: each scales its sum by world_size / n; DDP's all-reduce then averages.
    world = 2
    ranks = [gradient(model, [(*part, world / n)]) for part in (a, b)]
    ddp = sum(ranks) / world
    means = gradient(model, [(*a, 0.5 / counts[0]), (*b, 0.5 / counts[1])])  # mean of means
    print(f"  grad_accum 2, divided by the step's count: same gradient as one batch of 4: "
          f"{close(accumulated, reference)}")
    print(f"  2 ranks, x world_size / count, averaged by DDP: same gradient as one batch of 4: "
          f"{close(ddp, reference)}")
    off = 100 * (means - reference).norm() / reference.norm()
    print(f"  mean of the micro-batch means: same gradient as one batch of 4: "
          f"{close(means, reference)} (off by {off:.0f}% of its norm)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where to cache the tokenized blocks (default: a temporary folder)")
    args = parser.parse_args()
    folder = args.assets / "checkpoints" / "bert-tiny-splade-mlm"
    tokenizer = load_tokenizer(folder)
    model = load_pretrained(folder)  # eval mode: dropout off, so gradients are deterministic

    print("== 1. One optimizer step, cut three ways ==")
    with tempfile.TemporaryDirectory() as temporary:
        cache = args.cache_dir or temporary
        blocks = load_blocks({"test": args.assets / "corpus" / "wikitext-2-raw" / "wiki.test.raw"},
                             "test", tokenizer, max_seq_length=128, cache_dir=cache,
                             show_progress=False)
        input_ids = torch.from_numpy(blocks[:4].copy()).long()
    inputs, labels = mask_batch(input_ids, range(4), seed=0, epoch=0,
                                mask_token_id=tokenizer.token_to_id("[MASK]"),
                                special_token_ids=special_token_ids(tokenizer),
                                vocab_size=tokenizer.get_vocab_size())
    report(model, inputs, labels, "minibert's masks (19 per block)")

    # Per-token coin flips, as HuggingFace's DataCollatorForLanguageModeling draws them: the
    # number of targets now differs from block to block.
    generator = torch.Generator().manual_seed(0)
    flips = torch.rand(input_ids.shape, generator=generator) < 0.15
    flips[:, 0] = flips[:, -1] = False  # never [CLS] or [SEP]
    coin_labels = torch.where(flips, input_ids, IGNORE_INDEX)
    coin_inputs = input_ids.masked_fill(flips, tokenizer.token_to_id("[MASK]"))
    report(model, coin_inputs, coin_labels, "coin-flip masks")

    print("== 2. Why fp16 needs loss scaling ==")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        info = torch.finfo(dtype)
        bits = round(-math.log2(info.eps)) + 1  # eps = 2^-(significand bits - 1)
        print(f"  {str(dtype).replace('torch.', ''):<9} largest {info.max:.3g}, smallest normal "
              f"{info.tiny:.3g}, significand bits {bits}")
    small = torch.tensor(1e-8)
    scale = torch.amp.GradScaler("cpu").get_scale()  # the GradScaler's initial scale
    print(f"  a gradient of 1e-08 stored in fp16: {small.half().item():.3g}; "
          f"in bf16: {small.bfloat16().item():.3g}")
    print(f"  scaled by the GradScaler's initial {scale:.0f} first: "
          f"{(small * scale).half().item():.3g} in fp16, "
          f"{(small * scale).half().float().item() / scale:.3g} after unscaling in fp32")

    print("== 3. What CPU autocast leaves in bf16 ==")
    print(f"  torch {torch.__version__.split('+')[0]}, autocast on the CPU in bf16: "
          f"{cpu_autocast_dtypes()}")


def cpu_autocast_dtypes() -> str:
    """The dtype each operation returns under torch.autocast("cpu", bfloat16), on bf16 input."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=generator), torch.randn(8, 8, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x @ w  # a matmul: bf16 under autocast, the input of the operations below
        results = {"matmul": h, "softmax": h.softmax(dim=-1), "layer_norm": F.layer_norm(h, (8,)),
                   "gelu": F.gelu(h), "cross_entropy": F.cross_entropy(h, torch.zeros(4).long())}
    return ", ".join(f"{name} -> {str(t.dtype).replace('torch.', '')}"
                     for name, t in results.items())


if __name__ == "__main__":
    main()
