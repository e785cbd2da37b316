"""What a run keeps on disk to continue exactly where it stopped: resume checkpoints, and
the metrics log that a resumed run cuts back to the checkpoint's step.

    out_dir/checkpoints/step-N/
        model/               a minibert checkpoint folder (fill-mask and convert_weights read it)
        training_state.pt    optimizer, LR scheduler, GradScaler, the RNG state of every rank,
                             the data position and the config the run was started with,
                             which --resume compares with its own (RESUME_MUST_MATCH ...)

A folder is written under a temporary name, fsynced, and renamed into place
(minibert/safe_write.py), so a crash or a kill -9 mid-write leaves the previous checkpoints
intact and never a half-written one; older checkpoints are pruned only once the new one is
on disk, and renamed aside before they are deleted.

The data position is the number of optimizer steps done: every global batch is a fixed
slice of a permutation seeded by (seed, epoch), so (epoch, step in epoch) follows from the
step and the global batch size, which is stored to check that the resumed run uses the same.
Only dropout draws from torch's RNG (data order and masks have their own seeded generators),
so the CPU and CUDA generator states of each rank are all the RNG a checkpoint needs.

    out_dir/metrics.jsonl    one JSON object per line: step, steps (how many optimizer
                             steps the line's train_loss and tokens_per_s cover: log_every,
                             fewer on the first line after a resume and on a final or
                             evaluation line between two log steps), train_loss, lr,
                             grad_norm, tokens_per_s, mfu (when the peak is known),
                             loss_scale (fp16), and eval_loss, eval_perplexity,
                             eval_accuracy on evaluation lines; global_batch and tokens
                             (seen by this step) on every line
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import not_a_checkpoint, save_pretrained
from .distributed import is_main
from .errors import MinibertError
from .model import BertForMaskedLM
from .safe_write import atomic_folder, readable, remove_folder, write_text
from .train_config import TrainConfig
from .write_errors import DiskFullError, free_space

STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class DataPosition:
    """How far through the data a run is, and the batch shape that defines the position."""

    step: int  # optimizer steps done
    epoch: int  # epoch the next step reads from
    step_in_epoch: int  # global batches of that epoch already used
    global_batch_size: int  # sequences per optimizer step, all processes together
    num_train_blocks: int  # size of the training set the permutation was drawn over


class MetricsFile:
    """out_dir/metrics.jsonl, one JSON object per line; rank 0 only."""

    def __init__(self, path: Path, keep_until_step: int | None, global_batch_size: int = 0,
                 max_seq_length: int = 0):
        self.path = path
        # Every line also says how many tokens the run has seen by its step, and the global
        # batch, so that minibert.plot can compare runs of different batches (--x tokens).
        self.global_batch_size, self.max_seq_length = global_batch_size, max_seq_length
        if not is_main():
            return
        # A resumed run drops what the interrupted run logged after its checkpoint.
        write_text(path, log_until(path, keep_until_step) if keep_until_step is not None else "")

    def write(self, record: dict) -> None:
        """Append one line."""
        if is_main():
            if self.global_batch_size:
                record = {**record, "global_batch": self.global_batch_size,
                          "tokens": record["step"] * self.global_batch_size * self.max_seq_length}
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                     for k, v in record.items()}  # JSON has no inf/NaN: a skipped step logs null
            line = json.dumps(clean) + "\n"
            size = self.path.stat().st_size if self.path.exists() else 0
            try:
                with self.path.open("a", encoding="utf-8") as file:
                    file.write(line)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                os.truncate(self.path, size)  # no line cut short (shrinking needs no space)
                raise DiskFullError(self.path, free_space(self.path.parent), len(line)) from None


def log_until(path: Path, step: int) -> str:
    """The lines of the metrics log `path` up to `step` ("" when there is none); a line that is
    not JSON (cut short by a kill) is dropped."""
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
    return "".join(kept)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG state (dropout is the only consumer)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def not_a_resume_checkpoint(folder: Path) -> str | None:
    """What makes `folder` other than a resume checkpoint (model/, a checkpoint folder, and
    training_state.pt, nothing else): "notes.txt", "model/notes.txt"; None for one, or an
    empty folder. What its writer may replace, as --overwrite replaces only a checkpoint."""
    for entry in sorted(folder.iterdir()):
        if entry.name == "model" and entry.is_dir():
            if (problem := not_a_checkpoint(entry)) is not None:
                return f"model/{problem}"
        elif entry.name != STATE_FILE or not entry.is_file():
            return f"{entry.name}/" if entry.is_dir() else entry.name
    return None


def save_training_state(folder: str | Path, *, model: BertForMaskedLM, tokenizer_source: Path,
                        optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: torch.amp.GradScaler, rng_states: list[dict],
                        position: DataPosition, config: dict) -> Path:
    """Write one resume checkpoint folder atomically. `rng_states` holds one entry per rank.
    An existing folder is replaced only if it is a resume checkpoint itself."""
    if Path(folder).exists() and (problem := "not a folder" if not Path(folder).is_dir()
                                  else not_a_resume_checkpoint(Path(folder))) is not None:
        raise MinibertError(f"{folder}: not replaced: a resume checkpoint holds model/ and "
                            f"{STATE_FILE} only, and this one holds {problem}")
    needed = tensor_bytes(model.state_dict()) + tensor_bytes(optimizer.state_dict())
    with atomic_folder(folder, overwrite=True, needed=needed) as tmp:
        save_pretrained(model, tmp / "model", tokenizer_source=tokenizer_source)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng_states": rng_states,
                    "position": asdict(position), "config": config}, tmp / STATE_FILE)
    return Path(folder)


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested dict, list or tuple: about what saving them takes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def load_training_state(folder: str | Path) -> dict:
    """The contents of training_state.pt, with "position" as a DataPosition."""
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        raise MinibertError(f"{folder}: not a resume checkpoint (no {STATE_FILE})")
    try:
        # weights_only: tensors, dicts and numbers only, no arbitrary pickled code
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise MinibertError(f"{file}: unreadable ({type(error).__name__}: {error})") from None
    state["position"] = DataPosition(**state["position"])
    return state


def step_checkpoints(out_dir: str | Path) -> list[Path]:
    """out_dir/checkpoints/step-N folders, oldest first (temporary folders are ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def not_only_step_checkpoints(out_dir: str | Path) -> str | None:
    """What out_dir/checkpoints holds besides step-N resume checkpoints ("notes.txt",
    "step-2/notes.txt"), or None: what --overwrite may delete, as it deletes the folder."""
    root = Path(out_dir) / "checkpoints"
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not (_STEP_DIR.fullmatch(entry.name) and entry.is_dir()):
            return f"{entry.name}/" if entry.is_dir() else entry.name
        if (problem := not_a_resume_checkpoint(entry)) is not None:
            return f"{entry.name}/{problem}"
    return None


def checkpoint_step(folder: str | Path) -> int:
    """The step a resume checkpoint was saved at, read without loading its tensors."""
    file = Path(folder) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise MinibertError(f"{file}: unreadable ({type(error).__name__}: {error})") from None
    return state["position"]["step"]


def newest_checkpoint(out_dir: str | Path, kind: str = "complete",
                      then: str = "") -> str:
    """'the newest complete checkpoint is PATH' (followed by `then`, what to do with it), or
    that there is none: what a run that stops on an error tells the user to resume from."""
    found = step_checkpoints(out_dir)
    return f"the newest {kind} checkpoint is {found[-1]}{then}" if found else \
        "no checkpoint was saved"


def resolve_resume(resume: str, out_dir: str | Path) -> Path:
    """'latest' -> the newest checkpoint in out_dir; anything else is a checkpoint folder (or,
    where a replacement of it was interrupted, its complete side: safe_write.readable). Only
    reads: the run tidies its own out_dir before (resume.starting_point), never the source."""
    if resume == "latest":
        found = step_checkpoints(out_dir)
        if not found:
            raise MinibertError(f"--resume: no checkpoint in {Path(out_dir) / 'checkpoints'}")
        return found[-1]
    folder = readable(resume)  # reading never writes: an interrupted swap's complete side
    if not folder.is_dir():
        raise MinibertError(f"--resume {resume}: no such folder")
    if not (folder / STATE_FILE).is_file():
        raise MinibertError(f"--resume {resume}: not a resume checkpoint (no {STATE_FILE})")
    return folder


def prune(out_dir: str | Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` step checkpoints (keep_last 0 keeps all), and never
    `keep`, the checkpoint the run has just written."""
    if keep_last > 0:
        for folder in step_checkpoints(out_dir)[:-keep_last]:
            if keep is None or folder.resolve() != Path(keep).resolve():
                remove_folder(folder)  # renamed aside first: never seen half-deleted


# ---------------------------------------------------------------------------------------------
# What --resume accepts: every TrainConfig field is in exactly one of the three groups below
# (tests/test_train.py checks it, so a new field must be placed here).

RESUME_MUST_MATCH = frozenset({  # changes what the resumed steps compute: a different run
    "model", "init", "model_config", "data", "join_wikitext_artifacts", "max_seq_length",
    "mlm_probability", "whole_word_mask", "seed", "dropout", "adam_beta1", "adam_beta2",
    "adam_eps", "max_grad_norm"})
RESUME_MAY_CHANGE = frozenset({  # how long, how often, where: the steps compute the same
    "epochs", "max_steps", "out_dir", "cache_dir", "log_every", "eval_every", "eval_batch_size",
    "save_every", "keep_last", "resume", "overwrite", "peak_tflops"})
RESUME_CHANGE_WARNS = {  # accepted, and one line at resume says what the change does
    "batch_size": "the same global batch split differently: equal up to rounding",
    "grad_accum": "the same global batch split differently: equal up to rounding",
    "lr": "applied: the peak of the learning-rate schedule",
    "warmup_steps": "applied: the warmup of the learning-rate schedule",
    "warmup_ratio": "applied: the warmup of the learning-rate schedule",
    "weight_decay": "applied from the next step on",
    "precision": "the steps differ from the stopped run's by rounding",
    "device": "the steps differ from the stopped run's by rounding",
    "dist_backend": "the steps differ from the stopped run's by rounding",
    "compile": "the steps differ from the stopped run's by rounding",
    "eval_seed": "evaluations are not comparable with the earlier ones",
    "eval_max_blocks": "evaluations are not comparable with the earlier ones",
}


def compare_configs(saved: dict, config: TrainConfig) -> list[str]:
    """Check a resumed run's settings against those saved in its checkpoint: raise a
    MinibertError naming the first setting that must not change, return one line for each
    change that is accepted with a warning. Settings the checkpoint predates are not compared."""
    current = asdict(config)
    changed = [name for name in current if name in saved and saved[name] != current[name]]
    for name in changed:
        if name in RESUME_MUST_MATCH:
            raise MinibertError(
                f"--resume: {name} is {current[name]!r}, the checkpoint's run had "
                f"{saved[name]!r}; resume with the same {name}, or start a new run "
                f"(another --out_dir, or --overwrite)")
    return [f"resuming with {name} {saved[name]!r} -> {current[name]!r}: "
            f"{RESUME_CHANGE_WARNS[name]}"
            for name in changed if name in RESUME_CHANGE_WARNS]
