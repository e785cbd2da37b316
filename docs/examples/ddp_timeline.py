"""Draw docs/images/ddp_timeline.png: one optimizer step of bert-base on 2 ranks with 2
micro-batches each, under DistributedDataParallel.

    python docs/examples/ddp_timeline.py                    # writes docs/images/ddp_timeline.png
    python docs/examples/ddp_timeline.py --images /tmp/pictures

The first micro-batch runs inside no_sync(): its gradients stay in .grad, nothing is sent.
The second one's backward hands each gradient bucket to an all-reduce as soon as the bucket is
complete, so communication overlaps the rest of the backward; the optimizer step waits for the
last bucket. The buckets are bert-base's real ones, as DDP builds them (torch's own bucket
assignment, in reverse parameter order, the first bucket 1 MiB, then up to 25 MiB), and each
all-reduce is drawn as long as its bucket is large; the compute times are a sketch (a backward
takes about twice its forward), and rank 1 is drawn 5% slower, to show that a collective
starts only when both ranks are ready.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from minibert import BertConfig, BertForMaskedLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BUCKET_CAP_MB = 25  # DistributedDataParallel's default bucket_cap_mb
COLOURS = {"forward": "C0", "backward": "C1", "all-reduce": "C2", "optimizer step": "C4"}


def ddp_buckets(model: torch.nn.Module) -> list[tuple[list[str], int]]:
    """(parameter names, bytes) of each gradient bucket, in the order DDP reduces them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad][::-1]
    buckets, _ = dist._compute_bucket_assignment_by_size(
        [p for _, p in named], [dist._DEFAULT_FIRST_BUCKET_BYTES, BUCKET_CAP_MB * 2**20])
    return [([named[i][0] for i in bucket], sum(named[i][1].nbytes for i in bucket))
            for bucket in buckets]


def grouped(values: list[str]) -> str:
    """'2.3, 27.2, 27.0 x 11, 90.9': repeats counted."""
    parts = []
    for value, group in itertools.groupby(values):
        count = len(list(group))
        parts.append(f"{value} x {count}" if count > 1 else value)
    return ", ".join(parts)


def schedule(buckets: list[tuple[list[str], int]], slowdown: list[float]) -> list[list[tuple]]:
    """(lane, start, length, kind, label) boxes for each rank. Compute: a sketch in which each
    bucket's backward takes as long as its parameters are large (the embeddings' as long as a
    layer's: a lookup's gradient is cheap, but it is complete only when the backward ends)."""
    layer_bytes = sorted(size for _, size in buckets)[len(buckets) // 2]
    work = [min(size, layer_bytes) / layer_bytes for _, size in buckets]  # per bucket
    forward = sum(work) / 2
    ranks = []
    ready = []  # per rank, the time each bucket of micro-batch 2 is complete
    for slow in slowdown:
        boxes, t = [], 0.0
        for micro in (1, 2):
            boxes.append(("compute", t, forward * slow, "forward", f"forward {micro}"))
            t += forward * slow
            start = t
            done = []
            for w in work:  # one box a bucket: its gradients are complete at its end
                boxes.append(("compute", t, w * slow, "backward", ""))
                t += w * slow
                done.append(t)
            label = (f"backward {micro}, in no_sync(): no communication" if micro == 1
                     else f"backward {micro}, bucket by bucket")
            boxes.append(("compute", start, t - start, None, label))
        ready.append(done)
        ranks.append(boxes)
    # The all-reduces run one after another, each once both ranks have its bucket.
    t = 0.0
    reduces = []
    for k, (_, size) in enumerate(buckets):
        t = max(t, *(done[k] for done in ready))
        length = max(size / layer_bytes * 0.35, 0.08)  # the smallest still visible
        reduces.append(("comm", t, length, "all-reduce", ""))
        t += length
    for boxes in ranks:
        boxes += reduces
        boxes.append(("compute", t, 1.6, "optimizer step", "step"))
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO / "docs" / "images",
                        help="where to write ddp_timeline.png (default docs/images)")
    args = parser.parse_args()
    with torch.device("meta"):  # shapes only
        model = BertForMaskedLM(BertConfig())
    buckets = ddp_buckets(model)
    sizes = [f"{size / 2**20:.1f}" for _, size in buckets]
    print(f"bert-base under DDP: {len(buckets)} gradient buckets, reduced in this order (MB): "
          f"{grouped(sizes)}")
    print(f"first bucket: {', '.join(buckets[0][0])}")
    print(f"last bucket: {', '.join(buckets[-1][0])}")

    fig, ax = plt.subplots(figsize=(12, 3.8), layout="constrained")
    lanes = {}
    for rank, boxes in enumerate(schedule(buckets, slowdown=[1.0, 1.05])):
        for lane, start, length, kind, label in boxes:
            y = lanes.setdefault((rank, lane), len(lanes))
            if kind:  # None: a label over the boxes drawn before it
                ax.barh(y, length, left=start, height=0.7, color=COLOURS[kind],
                        edgecolor="white", linewidth=0.8)
            if label and kind:
                ax.text(start + length / 2, y, label, ha="center", va="center", fontsize=8,
                        color="white")
            elif label:
                ax.text(start + length / 2, y, label, ha="center", va="center", fontsize=8,
                        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85,
                              "linewidth": 0})
    ax.set_yticks(list(lanes.values()),
                  [f"rank {rank}: {'compute' if lane == 'compute' else 'all-reduce (NCCL)'}"
                   for rank, lane in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("time (a sketch: the all-reduces are drawn to their buckets' sizes)")
    ax.set_xticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax.legend(handles, list(COLOURS), ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    ax.set_title(f"one optimizer step of bert-base, 2 ranks x 2 micro-batches: its "
                 f"{len(buckets)} gradient buckets", pad=26)
    args.images.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.images / "ddp_timeline.png", dpi=100)
    print("wrote ddp_timeline.png")


if __name__ == "__main__":
    main()
