"""Loss curves from metrics.jsonl: train and eval loss against step, one colour per run.

    python -m minibert.plot runs/quickstart                        # -> runs/quickstart/loss.png
    python -m minibert.plot runs/a runs/b -o compare.png           # several runs on one figure
    python -m minibert.plot runs/a runs/b --x tokens -o compare.png  # against tokens seen

(Installed with pip, `minibert-plot` is the same command.)

Runs with different global batches take different amounts of data per optimizer step, so
against steps the larger batch looks faster than it is: `--x tokens` puts every run on the
tokens it has trained on (steps x global batch x max_seq_length, all processes together).
The legend gives each run's global batch.

The trainer calls `plot_runs([out_dir], out_dir / "loss.png")` at every evaluation. Figures
are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so this
works on machines without a display and changes nothing for other matplotlib users.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli import ArgumentParser
from .errors import MinibertError, run_main
from .safe_write import atomic_file


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The JSON objects of run_dir/metrics.jsonl, in order (a torn last line is skipped)."""
    file = Path(run_dir) / "metrics.jsonl"
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MinibertError(f"{run_dir}: no metrics.jsonl (not a training run folder)") from None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # the run may be writing this line right now
    return records


X_AXES = {"steps": ("step", "optimizer step"),
          "tokens": ("tokens", "tokens seen (all processes, [CLS] and [SEP] included)")}


def plot_runs(run_dirs: list[str | Path], out_file: str | Path, x: str = "steps") -> Path:
    """Draw train loss (lines) and eval loss (dots) of each run against x ("steps" or
    "tokens"); write a PNG atomically."""
    if x not in X_AXES:
        raise MinibertError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    key, label = X_AXES[x]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    for i, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        colour = colours[i % len(colours)]
        name = Path(run_dir).name or str(run_dir)
        if any(key not in r for r in records):
            raise MinibertError(f"{run_dir}: metrics.jsonl has lines without {key!r} (logged "
                                f"before minibert recorded it): plot it with --x steps")
        batches = sorted({r["global_batch"] for r in records if "global_batch" in r})
        if batches:
            name += f" (global batch {', '.join(map(str, batches))})"
        train = [(r[key], r["train_loss"]) for r in records if "train_loss" in r]
        evals = [(r[key], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), color=colour, alpha=0.8, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), "o--", color=colour, label=f"{name} eval")
    ax.set_xlabel(label)
    ax.set_ylabel("masked-LM loss (nats per masked token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out_file = Path(out_file)
    with atomic_file(out_file) as tmp:  # a viewer never sees a half-written image
        fig.savefig(tmp, dpi=100, format="png")
    return out_file


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="OUT_DIR", help="training output folders")
    parser.add_argument("-o", "--output", type=Path,
                        help="PNG to write (default: OUT_DIR/loss.png for one run, "
                             "loss-comparison.png for several)")
    parser.add_argument("--x", choices=tuple(X_AXES), default="steps",
                        help="horizontal axis: optimizer steps, or tokens seen, which compares "
                             "runs of different global batches fairly (default steps)")
    return parser.parse_args(argv)


def run(args) -> None:
    """Draw the runs of parsed `args` and say where the figure went."""
    output = args.output or (Path(args.run_dirs[0]) / "loss.png" if len(args.run_dirs) == 1
                             else Path("loss-comparison.png"))
    print(f"wrote {plot_runs(args.run_dirs, output, x=args.x)}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m minibert.plot` and the minibert-plot command."""
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
