"""Draw docs/images/lr_schedule.png: the learning rate of every update of the quickstart, and
what happens to it when the finished run is resumed with a larger max_steps.

    python docs/examples/lr_schedule.py                     # writes docs/images/lr_schedule.png
    python docs/examples/lr_schedule.py --images /tmp/pictures

The schedule is minibert's own: minibert.optimizer.make_optimizer with the quickstart's
settings (lr 1e-3, 8 warmup steps, 80 steps), stepped 80 times as the loop steps it. The
resume is minibert.optimizer.restore_optimizer, the function --resume calls, given the state
after step 80 and a run of 100 steps; its note is the line such a resume prints.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from minibert.optimizer import make_optimizer, restore_optimizer  # noqa: E402
from minibert.train_config import TrainConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def learning_rates(optimizer, scheduler, steps: range) -> list[float]:
    """The lr of each update in `steps`, stepping the scheduler as the loop does."""
    rates = []
    for _ in steps:
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()  # no gradients: nothing moves, but the step is counted
        scheduler.step()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO / "docs" / "images",
                        help="where to write lr_schedule.png (default docs/images)")
    args = parser.parse_args()
    weights = torch.nn.Linear(2, 2)  # the schedule does not look at the weights
    quickstart = TrainConfig(lr=1e-3, warmup_steps=8, max_steps=80, weight_decay=0.01)
    optimizer, scheduler = make_optimizer(weights, quickstart, warmup_steps=8, total_steps=80)
    first = learning_rates(optimizer, scheduler, range(0, 80))
    print("== the quickstart's schedule: lr 1e-3, 8 warmup steps, 80 steps ==")
    print("lr of updates 1, 2, 8, 9, 44, 80: " + ", ".join(
        f"{first[i - 1]:.3g}" for i in (1, 2, 8, 9, 44, 80)))

    print("== resumed after step 80 with --max_steps 100 ==")
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    longer = replace(quickstart, max_steps=100)
    optimizer, scheduler = make_optimizer(weights, longer, warmup_steps=8, total_steps=100)
    note = restore_optimizer(optimizer, scheduler, state, longer, warmup_steps=8,
                             total_steps=100, step=80)
    print(f"note: {note}")
    resumed = learning_rates(optimizer, scheduler, range(80, 100))
    optimizer, scheduler = make_optimizer(weights, longer, warmup_steps=8, total_steps=100)
    fresh = learning_rates(optimizer, scheduler, range(0, 100))
    print(f"updates 81 to 100 follow a 100-step run's schedule: {resumed == fresh[80:]}")

    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    ax.plot(range(1, 81), first, "o-", markersize=2.5, label="the quickstart, 80 steps")
    ax.plot(range(81, 101), resumed, "o-", markersize=2.5,
            label="resumed after step 80 with --max_steps 100")
    ax.plot(range(1, 101), fresh, "--", color="grey", linewidth=1,
            label="a 100-step run from the start")
    ax.axvspan(0.5, 8.5, color="C2", alpha=0.12, label="warmup: 8 steps")
    ax.set_xlabel("update (optimizer step)")
    ax.set_ylabel("learning rate")
    ax.set_title("linear warmup, then linear decay; a resume follows the new run's schedule")
    ax.legend()
    ax.grid(alpha=0.3)
    args.images.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.images / "lr_schedule.png", dpi=100)
    print("wrote lr_schedule.png")


if __name__ == "__main__":
    main()
