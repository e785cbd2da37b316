"""Fine-tune a BERT checkpoint with masked-LM on a text corpus, on CPU, one GPU or many.

    # CPU, offline: bert-tiny on the shared Wikipedia sample (how long: README, Quick start)
    python train.py --config configs/quickstart-cpu.toml

    # one process (one GPU, or the CPU), any setting overridden on the command line
    python train.py --config configs/bert-base-wikitext2-2xT4.toml --max_steps 100 --lr 1e-4

    # 2 GPUs on one machine (the reference setup: 2x T4), NCCL between them
    torchrun --nproc_per_node=2 train.py --config configs/bert-base-wikitext2-2xT4.toml

    # 2 machines x 4 GPUs: run this on every machine, with --node_rank 0 and 1
    torchrun --nnodes=2 --nproc_per_node=4 --node_rank=0 --master_addr=10.0.0.1 \\
        --master_port=29500 train.py --config configs/bert-base-wikitext2-2xT4.toml

    # 2 CPU processes (gloo): the same loop, e.g. to check multi-process runs without a GPU
    torchrun --standalone --nproc_per_node=2 train.py --config configs/quickstart-cpu.toml \\
        --batch_size 16 --out_dir runs/quickstart-2proc

    # continue a stopped run (SIGTERM or Ctrl-C saves a checkpoint first, then exits with
    # 143 or 130; a second one stops at once without saving)
    python train.py --config configs/quickstart-cpu.toml --resume

Installed with pip, `minibert-train` is the same command (`minibert-train --config FILE`;
under torchrun: `torchrun --nproc_per_node=2 -m minibert.train_cli --config FILE`).

Settings: defaults < --config FILE (TOML) < --key value flags; `--help` lists every one.
Outputs in out_dir: metrics.jsonl, loss.png, checkpoints/step-N/ (resume), final/ (a minibert
checkpoint for fill-mask and `convert_weights.py OUT/final HF --to-hf`). Compare runs with
`python -m minibert.plot runs/a runs/b -o compare.png`.
"""

from __future__ import annotations

import os
import sys

from . import distributed
from .errors import run_main, signal_exit_status
from .train_config import parse_config
from .trainer import train


def run(argv: list[str]) -> int:
    """Parse the settings, train; the exit status."""
    summary = train(parse_config(argv, description=__doc__), os.environ)
    # A stopped run is not a finished one: 130 after SIGINT, 143 after SIGTERM, so that
    # `python train.py && next` does not go on and a scheduler sees a pre-empted job.
    return signal_exit_status(summary["signal"]) if summary["stopped"] else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of train.py, `python -m minibert.train_cli` and the minibert-train command."""
    run_main(lambda: run(sys.argv[1:] if argv is None else argv),
             exit_with=distributed.exit_process)


if __name__ == "__main__":
    main()
