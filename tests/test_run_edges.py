"""The edges of real runs: going back to an older checkpoint, a loss that blows up, resuming a
run that has finished, a process stuck in a collective after a second signal, a full disk or
an unwritable folder. Tiny models and corpora (tests/test_train.py's fixtures)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import minibert.checkpoint
import minibert.data
from minibert.checkpoint import read_checkpoint
from minibert.errors import MinibertError
from minibert.train_config import parse_config
from minibert.train_state import (STATE_FILE, MetricsFile, load_training_state, prune,
                                  step_checkpoints)
from minibert.trainer import train
from test_train import (REPO, cache_dir, config_flags, fit_with, make_config,  # noqa: F401
                        read_metrics, run_cli, tiny_corpus, tiny_model)


def hidden_entries(folder) -> list[Path]:
    return [p for p in Path(folder).rglob(".*")]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Going back to an older checkpoint


def test_going_back_to_an_older_checkpoint_starts_a_new_line(make_config, capsys):
    """The issue's reproduction: save_every 2, keep_last 2 to step 4, then back to step-2 with
    save_every 1, keep_last 1, max_steps 3. The old line (step-4, final/, its metrics) is moved
    aside, never deleted; the new line's step-3 is kept; --resume latest continues it."""
    config = make_config("back", max_steps=4, eval_every=0, save_every=2, keep_last=2)
    train(config, environ={})
    out = Path(config.out_dir)
    old_log = (out / "metrics.jsonl").read_text()
    old_final = read_checkpoint(out / "final")[0].state_dict()
    capsys.readouterr()

    back = replace(config, resume=str(out / "checkpoints" / "step-2"), save_every=1,
                   keep_last=1, max_steps=3)
    train(back, environ={})
    assert [p.name for p in step_checkpoints(out)] == ["step-3"]  # saved and not pruned
    (aside,) = (out / "abandoned").iterdir()
    said = [line for line in capsys.readouterr().out.splitlines() if str(aside) in line]
    assert len(said) == 1 and "step-4" in said[0], said  # where, in one line
    assert [p.name for p in step_checkpoints(aside)] == ["step-4"]  # laid out like out_dir
    assert (aside / "metrics.jsonl").read_text() == old_log  # the old line's log, whole
    moved_final = read_checkpoint(aside / "final")[0].state_dict()
    assert all(torch.equal(old_final[k], moved_final[k]) for k in old_final)
    log = read_metrics(out)
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert old_log.splitlines()[:3] == (out / "metrics.jsonl").read_text().splitlines()[:3]

    summary = train(replace(back, resume="latest", max_steps=5), environ={})
    assert summary["start_step"] == 3 and summary["step"] == 5  # the new line goes on
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3, 4, 5]
    assert len(list((out / "abandoned").iterdir())) == 1  # nothing more was moved
    assert hidden_entries(out) == []


def test_a_kill_between_two_moves_is_finished_by_the_next_run(make_config, monkeypatch):
    """Killed after moving step-4 but before step-6: the next run finishes the moves before it
    looks for the newest checkpoint, so --resume latest continues from step-2."""
    config = make_config("back-killed", max_steps=6, eval_every=0, save_every=2, keep_last=0)
    train(config, environ={})
    out = Path(config.out_dir)
    import minibert.resume
    real_move, moves = minibert.resume.move, []

    def killed_at_the_second_move(src, dst):
        moves.append(src)
        if len(moves) == 2:
            raise SystemExit("killed")  # like a kill -9: no cleanup of ours runs after it
        real_move(src, dst)

    monkeypatch.setattr(minibert.resume, "move", killed_at_the_second_move)
    with pytest.raises(SystemExit):
        train(replace(config, resume=str(out / "checkpoints" / "step-2")), environ={})
    monkeypatch.setattr(minibert.resume, "move", real_move)
    assert [p.name for p in step_checkpoints(out)] == ["step-2", "step-6"]  # half moved

    summary = train(replace(config, resume="latest"), environ={})
    assert summary["start_step"] == 2 and summary["step"] == 6
    (aside,) = (out / "abandoned").iterdir()
    assert [p.name for p in step_checkpoints(aside)] == ["step-4", "step-6"]
    assert not (aside / "moving.json").exists() and (aside / "moved.json").is_file()


def test_resuming_from_an_abandoned_checkpoint_moves_the_current_line_aside(make_config):
    """Going back to the line that was abandoned: its checkpoint comes from outside
    out/checkpoints, so the whole current line moves aside, and the log starts from the
    abandoned line's own history up to its step."""
    config = make_config("forth", max_steps=4, eval_every=0, save_every=2, keep_last=0)
    train(config, environ={})
    out = Path(config.out_dir)
    train(replace(config, resume=str(out / "checkpoints" / "step-2"), max_steps=3,
                  save_every=1), environ={})
    (first,) = (out / "abandoned").iterdir()
    line_b = (out / "metrics.jsonl").read_text()

    summary = train(replace(config, resume=str(first / "checkpoints" / "step-4"), max_steps=5),
                    environ={})
    assert summary["start_step"] == 4
    second = next(p for p in (out / "abandoned").iterdir() if p != first)
    assert [p.name for p in step_checkpoints(second)] == ["step-2", "step-3"]
    assert (second / "metrics.jsonl").read_text() == line_b
    log = read_metrics(out)
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 5]
    first_log = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert log[:5] == first_log[:5]  # the abandoned line's own steps 0..4, not line b's 3


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    for step in (2, 3, 5):  # step-5: a later line's, left there
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_bytes(b"")
    prune(tmp_path, keep_last=1, keep=tmp_path / "checkpoints" / "step-3")
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step-3", "step-5"]


# ---------------------------------------------------------------------------------------------
# Resuming a run that has finished


def test_resuming_a_finished_run_has_nothing_to_do(make_config, capsys):
    config = make_config("finished", max_steps=2, eval_every=0, save_every=0)
    train(config, environ={})
    out = Path(config.out_dir)
    final = {p.name: p.stat() for p in (out / "final").iterdir()}
    log = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    summary = train(replace(config, resume="latest"), environ={})
    printed = capsys.readouterr().out
    assert "nothing to do: the run finished at step 2 (max_steps 2)" in printed.splitlines()
    assert "resumed from" not in printed
    assert not summary["stopped"] and summary["step"] == 2
    assert {p.name: p.stat() for p in (out / "final").iterdir()} == final  # not rewritten
    assert (out / "metrics.jsonl").read_text() == log

    train(replace(config, resume="latest", max_steps=1), environ={})
    assert ("nothing to do: the checkpoint is at step 2, past the last step (max_steps 1)"
            in capsys.readouterr().out.splitlines())
    summary = train(replace(config, resume="latest", max_steps=3), environ={})  # as before
    assert summary["start_step"] == 2 and summary["step"] == 3
    assert (out / "final" / "model.safetensors").stat().st_ino != final["model.safetensors"].st_ino


# ---------------------------------------------------------------------------------------------
# The end of a run in a process group


def test_a_two_process_run_ends_without_the_interpreters_teardown(make_config, tmp_path,
                                                                   monkeypatch):
    """DDP keeps its gloo group's threads alive past destroy_process_group, and the
    interpreter's teardown around them aborted about one exit in ten (status -6: torchrun
    reports a failed run). So the ranks end with os._exit once everything is written and
    stdout is flushed: an atexit hook (from a sitecustomize that every rank imports) never
    runs, and everything the run writes is there."""
    hooks = tmp_path / "site"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os, pathlib\n"
        "if 'RANK' in os.environ:\n"
        f"    atexit.register(pathlib.Path({str(tmp_path)!r}, 'teardown-' + os.environ['RANK'])"
        ".write_text, 'ran')\n")
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    config = make_config("two", batch_size=2, max_steps=1, eval_every=0)
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2", "train.py", *config_flags(config)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("teardown-*")) == []
    assert result.stdout.splitlines()[-1].startswith("wrote ")  # flushed before the exit
    read_checkpoint(Path(config.out_dir) / "final")
    assert read_metrics(config.out_dir)[-1]["step"] == 1


# ---------------------------------------------------------------------------------------------
# --overwrite deletes an earlier run's checkpoints, and nothing else


def test_overwrite_refuses_a_checkpoints_folder_that_holds_anything_else(make_config):
    config = make_config("again", max_steps=1, eval_every=0, save_every=0)
    train(config, environ={})
    out = Path(config.out_dir)
    (out / "checkpoints" / "notes.txt").write_text("mine")
    with pytest.raises(MinibertError) as error:
        train(replace(config, overwrite=True), environ={})
    assert "notes.txt" in one_line(error) and "--overwrite" in one_line(error)
    assert (out / "checkpoints" / "notes.txt").read_text() == "mine"  # nothing deleted
    assert [p.name for p in step_checkpoints(out)] == ["step-1"]

    (out / "checkpoints" / "notes.txt").unlink()
    summary = train(replace(config, overwrite=True, max_steps=2), environ={})
    assert summary["start_step"] == 0 and [p.name for p in step_checkpoints(out)] == ["step-2"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_final_folder_that_is_not_a_checkpoint_is_refused_before_the_first_step(
        make_config, overwrite):
    """final/ is replaced when the run ends: a final/ holding anything but a checkpoint stops
    the run before it trains, not after."""
    config = make_config("final", max_steps=1, eval_every=0, overwrite=overwrite)
    final = Path(config.out_dir) / "final"
    final.mkdir(parents=True)
    (final / "notes.txt").write_text("mine")
    with pytest.raises(MinibertError) as error:
        train(config, environ={})
    assert "final" in one_line(error) and "notes.txt" in one_line(error)
    assert sorted(p.name for p in Path(config.out_dir).iterdir()) == ["final"]  # no step ran
    assert (final / "notes.txt").read_text() == "mine"


def test_a_run_killed_between_its_last_checkpoint_and_final_gets_final_on_resume(make_config,
                                                                                 capsys):
    """The last step's checkpoint is written before final/: a kill (or a full disk) between
    the two leaves a finished line without its model. Resuming writes final/ from that
    checkpoint instead of saying that there is nothing to do."""
    config = make_config("no-final", max_steps=2, eval_every=0, save_every=0)
    train(config, environ={})
    out = Path(config.out_dir)
    written = read_checkpoint(out / "final")[0].state_dict()
    shutil.rmtree(out / "final")
    capsys.readouterr()

    summary = train(replace(config, resume="latest"), environ={})
    said = capsys.readouterr().out.splitlines()
    assert any(line.startswith("nothing to do: the run finished at step 2") and "final" in line
               for line in said), said
    assert summary["step"] == 2
    final = read_checkpoint(out / "final")[0].state_dict()
    assert final.keys() == written.keys()
    assert all(torch.equal(final[k], written[k]) for k in written)  # what the run wrote


# ---------------------------------------------------------------------------------------------
# A loss that blows up


@pytest.mark.parametrize("flag, value", [("lr", "inf"), ("lr", "nan"), ("warmup_ratio", "nan"),
                                         ("weight_decay", "inf"), ("adam_eps", "inf"),
                                         ("max_grad_norm", "inf"), ("dropout", "nan"),
                                         ("peak_tflops", "inf")])
def test_float_settings_must_be_finite(flag, value):
    with pytest.raises(MinibertError) as error:
        parse_config([f"--{flag}", value])
    assert f"{flag} must be a finite number" in one_line(error)


def nan_gradient_at(step: int):
    """A prepare for fit_with: the gradient of the word embeddings is NaN at that optimizer step
    (its loss, computed before the update, is still finite) and the weights are NaN after it."""
    def prepare(trainee):
        calls = []

        def hook(grad):
            calls.append(1)
            return grad * float("nan") if len(calls) == step else grad

        trainee.model.word_embeddings.register_hook(hook)
    return prepare


@pytest.mark.parametrize("precision, log_every, nan_step", [
    ("fp32", 10, 4),  # caught before the save at step 4: only the gradient norm is NaN there
    ("bf16", 2, 3),  # caught at the log line of step 4, whose loss is NaN
])
def test_a_loss_that_blows_up_stops_the_run(make_config, precision, log_every, nan_step):
    config = make_config(f"nan-{precision}-{log_every}", precision=precision, max_steps=8,
                         log_every=log_every, eval_every=0, save_every=2, keep_last=1)
    with pytest.raises(MinibertError) as error:
        fit_with(config, prepare=nan_gradient_at(nan_step))
    message = one_line(error)
    out = Path(config.out_dir)
    assert "step 4" in message and str(out / "checkpoints" / "step-2") in message, message
    assert [p.name for p in step_checkpoints(out)] == ["step-2"]  # nothing new, nothing pruned
    assert not (out / "final").exists()
    state = load_training_state(out / "checkpoints" / "step-2")
    assert all(torch.isfinite(t).all() for s in state["optimizer"]["state"].values()
               for t in s.values())
    assert hidden_entries(out) == []


def test_a_collapsed_fp16_loss_scale_stops_the_run(make_config):
    """Every gradient overflows from step 1 on: the GradScaler skips each step and halves its
    scale, from 2**16; below 1 (17 overflows) the run stops at the next log line."""
    def inf_gradients(trainee):
        trainee.model.word_embeddings.register_hook(lambda grad: grad * float("inf"))

    config = make_config("fp16-collapse", precision="fp16", max_steps=24, log_every=1,
                         eval_every=0, save_every=0)
    with pytest.raises(MinibertError) as error:
        fit_with(config, prepare=inf_gradients)
    message = one_line(error)
    assert "step 17" in message and "loss scale" in message and "0.5" in message, message
    assert "no checkpoint" in message
    out = Path(config.out_dir)
    assert step_checkpoints(out) == [] and not (out / "final").exists()


# ---------------------------------------------------------------------------------------------
# A full disk, an unwritable folder

SIZES = r"\(about [\d.]+ [kMG]B needed, [\d.]+ [kMG]B free\)"


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(make_config, monkeypatch):
    """ENOSPC is injected into torch.save at step 4 (tests/test_run_edges.py runs unprivileged
    in CI; a real 80 MB tmpfs gives the same line, see docs/appendix-operations.md, A.6)."""
    config = make_config("full-disk", max_steps=6, eval_every=0, save_every=2, keep_last=1)
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step-4" in str(path):
            Path(path).write_bytes(b"\0" * 1000)  # part of it was written
            no_space()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(MinibertError) as error:
        train(config, environ={})
    message = one_line(error)
    out = Path(config.out_dir)
    assert message.startswith(f"no space left on the device while writing "
                              f"{out / 'checkpoints' / 'step-4'} (about "), message
    assert re.search(SIZES, message), message
    assert message.endswith(f"the newest complete checkpoint is {out / 'checkpoints' / 'step-2'}")
    assert [p.name for p in step_checkpoints(out)] == ["step-2"]
    assert hidden_entries(out) == [] and not (out / "final").exists()


def test_a_full_disk_while_writing_final_is_one_line(make_config, monkeypatch):
    config = make_config("full-disk-final", max_steps=2, eval_every=0, save_every=2)
    real_save_file = minibert.checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if ".final." in str(path):
            no_space()
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(minibert.checkpoint, "save_file", save_file)
    with pytest.raises(MinibertError) as error:
        train(config, environ={})
    message = one_line(error)
    out = Path(config.out_dir)
    assert f"while writing {out / 'final'} (about " in message and re.search(SIZES, message)
    assert message.endswith(f"the newest complete checkpoint is {out / 'checkpoints' / 'step-2'}")
    assert hidden_entries(out) == [] and not (out / "final").exists()


def test_a_full_disk_while_caching_the_data_is_one_line(make_config, monkeypatch, tmp_path):
    config = make_config("full-disk-cache", cache_dir=str(tmp_path / "new-cache"))
    real_frame_blocks = minibert.data.frame_blocks

    def frame_blocks(*args, **kwargs):  # the writer's first blocks hit a full disk
        real_frame_blocks(*args, **kwargs)
        no_space()

    monkeypatch.setattr(minibert.data, "frame_blocks", frame_blocks)
    with pytest.raises(MinibertError) as error:
        train(config, environ={})
    message = one_line(error)
    assert message.startswith(f"no space left on the device while writing {tmp_path}/new-cache/")
    assert re.search(SIZES, message), message
    assert [p.name for p in (tmp_path / "new-cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_full_disk_cuts_no_metrics_line_short(tmp_path, monkeypatch):
    metrics = MetricsFile(tmp_path / "metrics.jsonl", keep_until_step=None)
    metrics.write({"step": 0})
    real_open = Path.open

    class HalfWritten:  # the disk fills after the first 5 characters of the line
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[:5])
            self.file.flush()
            no_space()

    monkeypatch.setattr(Path, "open", lambda self, mode="r", *args, **kwargs: (
        HalfWritten(real_open(self, mode, *args, **kwargs)) if mode == "a"
        else real_open(self, mode, *args, **kwargs)))
    with pytest.raises(MinibertError) as error:
        metrics.write({"step": 1, "train_loss": 1.0})
    assert one_line(error).startswith(f"no space left on the device while writing "
                                      f"{tmp_path / 'metrics.jsonl'}")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'


@pytest.mark.parametrize("setting", ["out_dir", "cache_dir"])
def test_an_unwritable_folder_is_one_line(make_config, tmp_path, setting):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    config = make_config(f"unwritable-{setting}", **{setting: str(blocker / "sub")})
    with pytest.raises(MinibertError) as error:
        train(config, environ={})
    assert f"{setting} {blocker / 'sub'}" in one_line(error)


# ---------------------------------------------------------------------------------------------
# A second signal while stuck in a collective

STUCK_RANK = """
import os, sys
from datetime import timedelta
import torch, torch.distributed as dist
from minibert.stopping import StopRequest
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=False)
group = dist.ProcessGroupGloo(store, 1, 2, timedelta(seconds=60))
with StopRequest():
    print("blocked", flush=True)
    group.allreduce([torch.zeros(1)]).wait()  # rank 0 never joins: no Python handler runs
"""


def test_a_second_signal_ends_a_process_stuck_in_a_collective():
    """Two gloo ranks: rank 1, a process of its own, waits in an all-reduce that rank 0 (in this
    process) never joins; two SIGTERMs must end it within seconds, with 143. Both build their
    process group directly, so that this process's torch.distributed state stays untouched."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    rank_1 = subprocess.Popen([sys.executable, "-c", STUCK_RANK, str(store.port)],
                              env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    groups = []  # rank 0 joins in a thread: the constructor waits for rank 1
    joining = threading.Thread(target=lambda: groups.append(
        dist.ProcessGroupGloo(store, 0, 2, timedelta(seconds=60))), daemon=True)
    joining.start()
    try:
        assert rank_1.stdout.readline() == "blocked\n", rank_1.stderr.read()
        time.sleep(0.5)  # inside the all-reduce
        rank_1.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        rank_1.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            status = rank_1.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 15 s after the second SIGTERM")
        waited = time.monotonic() - sent
        print(f"exited {waited:.1f} s after the second signal")
        assert status == 128 + signal.SIGTERM
        assert waited < 10
    finally:
        rank_1.kill()
        rank_1.communicate()
        joining.join(timeout=5)


ONE_SIGNAL_DURING_A_RENAME = """
import os, signal, time
import minibert.stopping
from minibert.safe_write import _signals_deferred
from minibert.stopping import StopRequest
minibert.stopping.FORCED_EXIT_AFTER_S = 0.2
with StopRequest() as stop:
    with _signals_deferred():  # held while names are swapped, then handed to the handler
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)  # a watchdog that counted it twice would end the process here
    print("requested" if stop.requested else "lost", flush=True)
"""


def test_one_signal_held_during_a_rename_counts_once():
    result = subprocess.run([sys.executable, "-c", ONE_SIGNAL_DURING_A_RENAME], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.splitlines()[-1] == "requested"
