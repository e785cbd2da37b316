"""One optimizer step with uneven masked-token counts across ranks; used by
tests/test_stop_resume.py, run by torchrun (2 processes) and in the test process (1).

    torchrun --standalone --nproc_per_node=2 tests/uneven_step_worker.py CONFIG_JSON OUT_DIR

Row i of a batch keeps only 1 + (block index) % 5 of its masked tokens, so the two ranks of a
step hold different numbers of targets: dividing each rank's loss by its own count and letting
DDP average the gradients would then give a different gradient than one process over the
whole batch. Writes OUT_DIR/rank-R.pt: the gradients of the first step, this rank's masked
count in it, and the evaluations of the run.
"""

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Mapping

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minibert.masking import IGNORE_INDEX  # noqa: E402
from minibert.train_config import TrainConfig  # noqa: E402
from minibert.trainer import build, fit, setup  # noqa: E402


def uneven(mask, train_seed: int, counts: list):
    def masked(input_ids, indices, *, seed, epoch):
        inputs, labels = mask(input_ids, indices, seed=seed, epoch=epoch)
        for row, index in enumerate(indices):
            targets = (labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
            labels[row, targets[1 + int(index) % 5:]] = IGNORE_INDEX
        if seed == train_seed:  # a training batch (evaluation uses eval_seed)
            counts.append(int((labels != IGNORE_INDEX).sum()))
        return inputs, labels
    return masked


def main(config: TrainConfig, out_dir: Path, environ: Mapping[str, str]) -> None:
    run = setup(config, environ)
    counts: list[int] = []
    run.mask = uneven(run.mask, config.seed, counts)
    trainee = build(config, run)
    grads: dict[str, torch.Tensor] = {}
    optimizer_step = trainee.optimizer.step

    def recording_step(*args, **kwargs):  # what GradScaler.step calls: the final gradients
        if not grads:
            grads.update({name: p.grad.detach().clone()
                          for name, p in trainee.model.named_parameters()})
        return optimizer_step(*args, **kwargs)

    trainee.optimizer.step = recording_step
    with warnings.catch_warnings():  # torch notices the wrapper; it calls the real step
        warnings.filterwarnings("ignore", message=re.escape("Seems like `optimizer.step()`"))
        summary = fit(config, run, trainee)
    torch.save({"grads": grads, "count": counts[0], "evals": summary["evals"]},
               out_dir / f"rank-{run.launch.rank}.pt")


if __name__ == "__main__":
    main(TrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), os.environ)
