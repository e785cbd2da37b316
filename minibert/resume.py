"""Resuming a run: what a resume restores, what it decides before the first step, and what it
does to out_dir first.

    resume_from = starting_point(config, out_dir)         # None: a fresh run; out_dir checked
    prepare_out_dir(run)                                  # rank 0: create it; --overwrite
    step = restore(run, optimizer, scheduler, scaler)     # the checkpoint's state, checked
    message = nothing_to_do(step, total_steps, config)   # a finished run: say so, write nothing
    line = plan_new_line(out_dir, resume_from, step)      # going back: what is moved aside
    start_new_line(line)                                  # rank 0, before anything is written
    finish_new_lines(out_dir)                             # rank 0: moves a kill interrupted

Continuing. `--resume` (the newest checkpoint) continues the line of checkpoints a run was
writing: nothing moves; metrics.jsonl is cut back to the checkpoint's step (the steps after it
are computed again, identically). A run already at its last step has nothing to do.

Going back. Resuming from a checkpoint other than the newest, to continue from before a loss
spike say, starts a new line. What the old line wrote after the resume step would mix with it:
`--resume` would pick its newer checkpoints, pruning would keep them and delete the new ones,
metrics.jsonl would hold both. So the old line's later step-N folders, its final/ and its log
are moved aside, never deleted, into one folder that nothing reads on its own:

    out_dir/abandoned/YYYYMMDD-HHMMSS/    laid out as out_dir, so that it can be plotted beside
        checkpoints/step-N/               the new line (python -m minibert.plot OUT
        final/                            OUT/abandoned/...) and resumed from in its turn
        metrics.jsonl                     the old line's whole log
        moved.json                        what moved where, and the step the new line starts at

Resuming from a checkpoint outside out_dir/checkpoints (such as an abandoned one) while
out_dir holds checkpoints starts a new line the same way: all of them are moved aside, and
metrics.jsonl starts with that checkpoint's own log (the metrics.jsonl of the run folder it
sits in) up to its step.

A kill between two moves. The folder is made complete, with its plan (moving.json), in one
rename; then each path is renamed into it (safe_write.move) and metrics.jsonl is rewritten
(write_text), and moving.json becomes moved.json. A run killed halfway leaves the plan: the
next run in out_dir carries it out to the end (finish_new_lines) before it looks for the
newest checkpoint, so `--resume` never continues half of the old line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import distributed
from .checkpoint import not_a_checkpoint
from .distributed import is_main, print0
from .errors import MinibertError
from .optimizer import restore_optimizer
from .safe_write import atomic_folder, move, recover_and_tidy, remove_folder, write_text
from .train_config import TrainConfig
from .train_state import (DataPosition, compare_configs, load_training_state, log_until,
                          not_only_step_checkpoints, resolve_resume, set_rng_state,
                          step_checkpoints)
from .write_errors import make_folder

if TYPE_CHECKING:  # the trainer's Run: what setup() prepared (no import at run time)
    from .trainer import Run

ABANDONED = "abandoned"
PLAN, DONE = "moving.json", "moved.json"


def starting_point(config: TrainConfig, out_dir: Path) -> Path | None:
    """The checkpoint folder this run resumes from, or None for a fresh run; refuses a fresh
    run in an out_dir that holds checkpoints unless overwrite is set."""
    if is_main():  # finish or undo a checkpoint write that a kill interrupted, before looking
        recover_and_tidy(out_dir / "checkpoints")
        for folder in finish_new_lines(out_dir):  # and the moves of a new line (below)
            print0(f"note: finished moving an abandoned line to {folder} (a run was stopped "
                   f"while moving it)")
    distributed.barrier()
    resume_from = resolve_resume(config.resume, out_dir) if config.resume else None
    if resume_from is None and step_checkpoints(out_dir):
        if not config.overwrite:
            raise MinibertError(f"{out_dir} holds checkpoints of an earlier run: pass --resume "
                                f"to continue it, --overwrite to start afresh, or another "
                                f"--out_dir")
        if (problem := not_only_step_checkpoints(out_dir)) is not None:
            raise MinibertError(f"{out_dir / 'checkpoints'}: --overwrite deletes an earlier "
                                f"run's step-N checkpoints and nothing else, and this folder "
                                f"holds {problem}; move it or choose another --out_dir")
    final = out_dir / "final"  # replaced when the run ends: refuse now, not after training
    if final.exists() and (problem := "is a file" if not final.is_dir()
                           else not_a_checkpoint(final)) is not None:
        raise MinibertError(f"{final}: the run writes its model there when it ends, and this is "
                            f"not a checkpoint folder ({problem}); move it or choose another "
                            f"--out_dir")
    return resume_from


def prepare_out_dir(run: Run) -> None:
    """What the run does to out_dir before its first step (rank 0, once every check passed):
    create it; with overwrite, delete the earlier run's checkpoints."""
    make_folder(run.out_dir, "out_dir")
    if run.resume_from is None and run.config.overwrite:
        remove_folder(run.out_dir / "checkpoints")


def restore(run: Run, optimizer, scheduler, scaler) -> int:
    """Load optimizer, scheduler, GradScaler and this rank's RNG state; return the step.

    The run's settings are compared with the checkpoint's first (train_state.compare_configs):
    one that changes what the steps compute is refused, an accepted change is reported. A new
    lr, warmup or weight_decay is applied, and the learning rate always follows this run's
    schedule (optimizer.restore_optimizer): extending max_steps reshapes it, and one line says
    how the lr moves."""
    state = load_training_state(run.resume_from)
    notes = compare_configs(state["config"], run.config)
    position: DataPosition = state["position"]
    if (position.global_batch_size, position.num_train_blocks) != (
            run.global_batch_size, len(run.train_blocks)):
        raise MinibertError(
            f"{run.resume_from}: saved with a global batch of {position.global_batch_size} over "
            f"{position.num_train_blocks} blocks, this run has {run.global_batch_size} over "
            f"{len(run.train_blocks)}; resume with the same data, batch_size x grad_accum x "
            f"processes")
    note = restore_optimizer(optimizer, scheduler, state, run.config,
                             warmup_steps=run.warmup_steps, total_steps=run.total_steps,
                             step=position.step)
    if note is not None:
        notes.append(note)
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    rng_states = state["rng_states"]
    if len(rng_states) == run.launch.world_size:
        set_rng_state(rng_states[run.launch.rank], run.device)
    else:
        notes.append(f"the checkpoint holds RNG states of {len(rng_states)} processes, this run "
                     f"has {run.launch.world_size}: dropout draws will differ from the original run")
    for note in notes:
        print0(f"note: {note}")
    print0(f"resumed from {run.resume_from} at step {position.step}")
    return position.step


def nothing_to_do(step: int, total_steps: int, config: TrainConfig) -> str | None:
    """The line to print instead of training when a resumed run is already at its last step."""
    if step < total_steps:
        return None
    limit = (f"max_steps {config.max_steps}" if config.max_steps
             else f"epochs {config.epochs}: {total_steps} steps")
    if step == total_steps:
        return f"nothing to do: the run finished at step {step} ({limit})"
    return f"nothing to do: the checkpoint is at step {step}, past the last step ({limit})"


@dataclass
class NewLine:
    """What resuming at `step` from `resume_from` moves aside in out_dir."""

    out_dir: Path
    step: int  # the step the new line starts from
    checkpoints: list[Path]  # out_dir's step checkpoints that are not on the resumed line
    final: bool  # out_dir/final exists and belongs to the old line
    log_from: Path  # whose metrics.jsonl lines up to `step` start out_dir's new one


def plan_new_line(out_dir: Path, resume_from: Path, step: int) -> NewLine | None:
    """None when the resume continues out_dir's line; else what moves aside (reads only)."""
    found = step_checkpoints(out_dir)
    ours = resume_from.resolve() in [p.resolve() for p in found]
    if ours:
        later = [p for p in found if _step_of(p) > step]
    else:  # from another folder: none of out_dir's checkpoints is on its line
        later = found
    if not later:
        return None
    log_from = (out_dir if ours else resume_from.parent.parent) / "metrics.jsonl"
    return NewLine(out_dir, step, later, (out_dir / "final").is_dir(), log_from)


def start_new_line(line: NewLine) -> str:
    """Move the old line aside (rank 0 only); returns the line that says where it went."""
    out_dir = line.out_dir
    folder = _unused(out_dir / ABANDONED / time.strftime("%Y%m%d-%H%M%S"))
    moves = [(p, folder / "checkpoints" / p.name) for p in line.checkpoints]
    if line.final:
        moves.append((out_dir / "final", folder / "final"))
    metrics = out_dir / "metrics.jsonl"
    # Paths in the plan are relative to out_dir (which may be moved, or named from another
    # folder next time), but for a log outside it. The new line's log is the lines up to
    # `step` of log_from: the old log's copy in the folder when the line is out_dir's own.
    log_from = (folder / "metrics.jsonl").relative_to(out_dir) if line.log_from == metrics \
        else line.log_from.resolve()
    plan = {"step": line.step, "log_from": str(log_from),
            "moves": [[str(a.relative_to(out_dir)), str(b.relative_to(out_dir))]
                      for a, b in moves]}
    with atomic_folder(folder) as tmp:
        (tmp / "checkpoints").mkdir()
        if metrics.is_file():
            (tmp / "metrics.jsonl").write_bytes(metrics.read_bytes())
        (tmp / PLAN).write_text(json.dumps(plan) + "\n", encoding="utf-8")
    _carry_out(out_dir, folder)
    moved = [p.name for p in line.checkpoints] + ["final/"] * line.final
    return (f"a new line from step {line.step}: the old line's {', '.join(moved)} and its "
            f"metrics moved to {folder}")


def finish_new_lines(out_dir: Path) -> list[Path]:
    """Carry out the plans that a kill interrupted (rank 0); returns their folders."""
    root = out_dir / ABANDONED
    recover_and_tidy(root)  # a folder that was being made when the kill came
    plans = sorted(root.glob(f"*/{PLAN}")) if root.is_dir() else []
    for plan in plans:
        _carry_out(out_dir, plan.parent)
    return [plan.parent for plan in plans]


def _carry_out(out_dir: Path, folder: Path) -> None:
    """Every move of folder's plan not done yet, the new line's log, then the plan is done."""
    plan = json.loads((folder / PLAN).read_text(encoding="utf-8"))
    for src, dst in plan["moves"]:
        if (out_dir / src).exists() and not (out_dir / dst).exists():
            move(out_dir / src, out_dir / dst)
    write_text(out_dir / "metrics.jsonl", log_until(out_dir / plan["log_from"], plan["step"]))
    move(folder / PLAN, folder / DONE)


def _unused(folder: Path) -> Path:
    """`folder`, or folder-2, folder-3 ... if it is taken (two lines abandoned in one second)."""
    candidate, n = folder, 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    return candidate


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])  # step_checkpoints lists step-N names only
