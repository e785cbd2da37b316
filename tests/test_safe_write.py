"""Nothing half-written on disk: folder replacement that is atomic whatever signal arrives,
fsync before a write becomes visible, the user's umask, leftovers of killed writers, and
kill -9 at random moments of a conversion with --overwrite."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BERT_TINY, REPO
from convert_weights import convert, parse_args as convert_args
from minibert import safe_write
from minibert.checkpoint import read_checkpoint, save_pretrained
from minibert.data import write_atomically
from minibert.model import BertConfig, BertForMaskedLM
from minibert.plot import plot_runs
from minibert.errors import MinibertError
from minibert.train_state import (STATE_FILE, DataPosition, prune, save_training_state,
                                  step_checkpoints)

TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16)


def tiny(seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(**TINY))


def same_weights(a: BertForMaskedLM, b: BertForMaskedLM) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


def which(folder: Path, models: dict) -> str:
    """The name of the model that `folder` holds completely (read_checkpoint checks it all)."""
    loaded, _, _ = read_checkpoint(folder)
    found = [name for name, model in models.items() if same_weights(loaded, model)]
    assert len(found) == 1
    return found[0]


@pytest.fixture(params=["exchange", "three renames"])
def swap(request, monkeypatch):
    """Run a test with renameat2(RENAME_EXCHANGE), and as on a system without it."""
    if request.param == "three renames":
        monkeypatch.setattr(safe_write, "_exchange", lambda a, b: False)
    return request.param


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Replacing a folder


def test_a_signal_at_any_rename_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch, swap):
    """Ctrl-C right after each rename of a replacement: DST is complete at once (no recovery
    step) and nothing is left beside it. (Today's swap takes one call, or three renames during
    which a Python signal handler is held back.)"""
    old, new = tiny(1), tiny(2)
    real_rename, real_exchange = os.rename, safe_write._exchange
    for interrupt_after in range(1, 5):
        dst = tmp_path / f"model-{interrupt_after}"
        save_pretrained(old, dst)
        renames = []

        def counted(function):
            def call(*args):
                result = function(*args)
                renames.append(args)
                if len(renames) == interrupt_after:
                    signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt at the next bytecode
                return result
            return call

        monkeypatch.setattr(os, "rename", counted(real_rename))
        monkeypatch.setattr(safe_write, "_exchange", counted(safe_write._exchange))
        interrupted = False
        try:
            save_pretrained(new, dst, overwrite=True)
        except KeyboardInterrupt:
            interrupted = True
        monkeypatch.setattr(os, "rename", real_rename)
        monkeypatch.setattr(safe_write, "_exchange", real_exchange)
        assert which(dst, {"old": old, "new": new}) == "new", renames
        assert hidden_entries(tmp_path) == []
        if not interrupted:
            break


COPY_AND_DIE = """
import os, shutil, sys
sys.path.insert(0, {repo!r})
from minibert import safe_write
count = []
real_rename = os.rename
def rename_then_die(src, target):
    real_rename(src, target)
    count.append(1)
    if len(count) == {kill_after}:
        os._exit(9)  # like SIGKILL: no finally, no cleanup
safe_write._exchange = lambda a, b: False
os.rename = rename_then_die
with safe_write.atomic_folder({dst!r}, overwrite=True) as tmp:
    for file in os.listdir({new!r}):
        shutil.copyfile(os.path.join({new!r}, file), tmp / file)
"""


def test_a_killed_swap_is_read_from_its_complete_side_and_finished_by_the_next_write(tmp_path):
    """SIGKILL between the three renames of a swap (where RENAME_EXCHANGE is missing): a read of
    DST reads the complete side (.new, else .old) and changes nothing; the next write beside
    it finishes the swap from the complete .new folder, or undoes it from .old."""
    old, new = tiny(1), tiny(2)
    save_pretrained(new, tmp_path / "new-source")
    for kill_after in (1, 2):
        dst = tmp_path / "out" / f"model-{kill_after}"
        save_pretrained(old, dst)
        script = COPY_AND_DIE.format(repo=str(REPO), kill_after=kill_after, dst=str(dst),
                                     new=str(tmp_path / "new-source"))
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert result.returncode == 9, result.stderr
        assert dst.exists() == (kill_after == 1)  # after the second rename DST is missing
        expected = "old" if kill_after == 1 else "new"
        names = sorted(p.name for p in dst.parent.iterdir())
        assert which(dst, {"old": old, "new": new}) == expected
        assert sorted(p.name for p in dst.parent.iterdir()) == names  # reading wrote nothing
        save_pretrained(tiny(3), dst.parent / f"beside-{kill_after}")  # a write beside: tidies
        assert hidden_entries(dst.parent) == [] and dst.is_dir()
        assert which(dst, {"old": old, "new": new}) == expected


# ---------------------------------------------------------------------------------------------
# Durability and modes


def test_everything_is_fsynced_before_it_becomes_visible(tmp_path, monkeypatch, swap):
    """Every file and folder of a new checkpoint is fsynced before the rename that publishes
    it, and the parent folder after (else a power cut can leave a name pointing at empty
    files)."""
    events = []
    real_fsync, real_rename, real_exchange = os.fsync, os.rename, safe_write._exchange

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", Path(src), Path(dst)))
        real_rename(src, dst)

    def exchange(a, b):
        done = real_exchange(a, b)
        if done:
            events.append(("rename", Path(a), Path(b)))
        return done

    dst = tmp_path / "model"
    save_pretrained(tiny(1), dst, tokenizer_source=BERT_TINY)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(safe_write, "_exchange", exchange if swap == "exchange"
                        else lambda a, b: False)
    save_pretrained(tiny(2), dst, tokenizer_source=BERT_TINY, overwrite=True)

    publish = max(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == dst)
    synced = [e[1].relative_to(tmp_path).parts for e in events[:publish] if e[0] == "fsync"]
    written = [p.relative_to(dst).parts for p in dst.rglob("*")] + [()]
    assert {"model.safetensors", "config.json", "vocab.txt"} <= {p[0] for p in written if p}
    for relative in written:  # every file and folder of it, under its temporary name
        assert any(s[0].startswith(".model.tmp-") and s[1:] == relative for s in synced), relative
    assert ("fsync", tmp_path) in events[publish:]  # the parent, which holds the new name


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_pretrained(tiny(1), tmp_path / "model", tokenizer_source=BERT_TINY)
        save_pretrained(tiny(2), tmp_path / "model", tokenizer_source=BERT_TINY, overwrite=True)
        write_atomically(tmp_path / "blocks.npy", torch.zeros(2, 3).numpy())
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "train_loss": 1.0}\n')
        plot_runs([tmp_path / "run"], tmp_path / "run" / "loss.png")
    finally:
        os.umask(previous)
    folders = [tmp_path / "model"]
    files = [*(tmp_path / "model").iterdir(), tmp_path / "blocks.npy",
             tmp_path / "run" / "loss.png"]
    for path in folders:
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


# ---------------------------------------------------------------------------------------------
# Leftovers


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_killed_writers_are_removed_by_the_next_write_beside_them(tmp_path):
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:40]
    stale_folder = tmp_path / f".step-4.tmp-{dead_pid()}-{host}-0a1b2c"
    stale_folder.mkdir()
    (stale_folder / "model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".loss.png.tmp-{dead_pid()}-{host}-3d4e5f"
    stale_file.write_bytes(b"half")
    deleting = tmp_path / f".step-3.del-{dead_pid()}-{host}-6a7b8c"  # a killed remove_folder
    deleting.mkdir()
    live = tmp_path / f".step-5.tmp-{os.getppid()}-{host}-abcdef"  # its writer still runs
    live.mkdir()
    foreign = tmp_path / f".step-6.tmp-{dead_pid()}-otherhost-123456"  # another machine's
    foreign.mkdir()
    old_style = tmp_path / ".step-7.tmp-k2j3h4g5"  # tempfile.mkdtemp's name, no writer known
    old_style.mkdir()

    with pytest.warns(UserWarning) as caught:
        save_pretrained(tiny(1), tmp_path / "step-8")
    assert not stale_folder.exists() and not stale_file.exists() and not deleting.exists()
    assert live.exists()  # a running writer's temporary is never touched
    warned = " ".join(str(w.message) for w in caught)
    assert str(foreign) in warned and str(old_style) in warned
    assert foreign.exists() and old_style.exists()  # named, not deleted


def test_a_leftover_with_this_pid_but_another_process_stamp_is_judged_dead(tmp_path):
    """After a container restart the same host name and PID (often 1) come back: the PID in
    a leftover's name does not tell its writer from this process. The name also carries a
    stamp of the writer's boot and start time; a leftover with this process's PID and host
    but another stamp is a dead writer's: its temporary is deleted and its interrupted swap
    finished by the next write beside it."""
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:40]
    pid = os.getpid()
    stamp = safe_write._aside(tmp_path / "x", "tmp").name.split("-")[-2]  # this process's
    other = "0" * len(stamp) if stamp != "0" * len(stamp) else "1" * len(stamp)
    stale = tmp_path / f".step-4.tmp-{pid}-{host}-{other}-0a1b2c"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    # An interrupted swap of `final`: the new folder is complete, the old one moved aside.
    for model, piece in ((tiny(1), f".final.old-{pid}-{host}-{other}-111111"),
                         (tiny(2), f".final.new-{pid}-{host}-{other}-222222")):
        save_pretrained(model, tmp_path / "elsewhere" / "model")
        os.rename(tmp_path / "elsewhere" / "model", tmp_path / piece)
    (tmp_path / "elsewhere").rmdir()
    mine = tmp_path / f".step-5.tmp-{pid}-{host}-{stamp}-abcdef"  # this very process's
    mine.mkdir()

    save_pretrained(tiny(3), tmp_path / "step-8")  # a write beside them
    assert not stale.exists()
    assert which(tmp_path / "final", {"old": tiny(1), "new": tiny(2)}) == "new"
    assert hidden_entries(tmp_path) == [mine.name]  # a running writer's temporary is kept


def test_without_proc_leftovers_are_judged_by_pid_and_host(tmp_path, monkeypatch):
    """Where /proc is missing (other systems) names carry no stamp and a leftover's writer is
    judged by its PID alone, as a write on such a system can tell."""
    monkeypatch.setattr(safe_write, "_PROC", tmp_path / "no-proc")
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:40]
    name = safe_write._aside(tmp_path / "step-1", "tmp").name
    assert safe_write._LEFTOVER.fullmatch(name).group("stamp") is None
    stale = tmp_path / f".step-4.tmp-{dead_pid()}-{host}-0a1b2c"
    stale.mkdir()
    live = tmp_path / f".step-5.tmp-{os.getppid()}-{host}-abcdef"
    live.mkdir()
    save_pretrained(tiny(3), tmp_path / "step-8")
    assert not stale.exists() and live.exists()

def test_pruning_never_shows_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        folder = tmp_path / "checkpoints" / f"step-{step}"
        save_pretrained(tiny(step), folder / "model")
        (folder / STATE_FILE).write_bytes(b"state")
    seen = []
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):  # is step-1 still listed at each deletion of its files?
        seen.append([p.name for p in step_checkpoints(tmp_path)])
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    prune(tmp_path, keep_last=1)
    assert seen and all(names == ["step-2"] for names in seen), seen
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


# ---------------------------------------------------------------------------------------------
# What --overwrite replaces: a checkpoint folder, nothing else


def names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_replaces_a_checkpoint_folder_and_nothing_else(tmp_path, monkeypatch):
    notes = tmp_path / "notes"  # the user's folder: a note and a subfolder
    (notes / "sub").mkdir(parents=True)
    (notes / "notes.txt").write_text("mine")
    (notes / "sub" / "data.txt").write_text("mine too")
    for flags in ([], ["--overwrite"]):
        with pytest.raises(MinibertError, match=r"notes: (already exists|--overwrite replaces "
                                                r"only a checkpoint folder .* holds notes.txt)"):
            convert(convert_args([str(BERT_TINY), str(notes), *flags]))
    with pytest.raises(MinibertError, match="only a checkpoint folder"):
        save_pretrained(tiny(1), notes, overwrite=True)
    assert names(notes) == ["notes.txt", "sub", "sub/data.txt"]

    # A checkpoint is replaced: minibert's (train.py's final/ is one), HuggingFace's, and an
    # empty folder, which holds nothing to lose.
    dst = tmp_path / "dst"
    convert(convert_args([str(BERT_TINY), str(dst)]))
    for flags in (["--to-hf"], [], []):
        convert(convert_args([str(BERT_TINY), str(dst), "--overwrite", *flags]))
        assert (dst / "config.json").is_file()
    save_pretrained(tiny(2), dst, overwrite=True)
    (tmp_path / "empty").mkdir()
    save_pretrained(tiny(2), tmp_path / "empty", overwrite=True)
    assert names(tmp_path / "empty") == ["config.json", "model.safetensors"]


def test_overwrite_never_replaces_the_current_folder_a_source_parent_home_or_root(tmp_path,
                                                                                  monkeypatch):
    source = tmp_path / "models" / "source"
    save_pretrained(tiny(1), source)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()  # empty, as work is: the rule for a checkpoint alone would let them go
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for dst, why in ((".", "the current folder"), ("..", "the current folder"),
                     (str(source.parent), f"holds the source {source}"),
                     (str(home), "the home folder"), ("/", "never replaces /")):
        with pytest.raises(MinibertError, match=re.escape(why)):
            save_pretrained(tiny(2), dst, overwrite=True, tokenizer_source=source)
    assert names(tmp_path) == ["home", "models", "models/source", "models/source/config.json",
                               "models/source/model.safetensors", "work"]
    # The command: one line, exit 1, no traceback (DST "." once crashed in with_name).
    result = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), str(BERT_TINY), ".",
                             "--overwrite"], capture_output=True, text=True, cwd=work)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr == f"error: .: --overwrite never replaces the current folder or a " \
                            f"folder that holds it ({work})\n"


def test_a_resume_checkpoint_replaces_only_a_resume_checkpoint(tmp_path):
    model = tiny(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def save(folder: Path) -> None:
        save_training_state(
            folder, model=model, tokenizer_source=None, optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
            scaler=torch.amp.GradScaler("cpu", enabled=False), rng_states=[],
            position=DataPosition(2, 0, 2, 4, 40), config={})

    step = tmp_path / "checkpoints" / "step-2"
    save(step)
    save(step)  # a step-N folder (model/ and training_state.pt) is replaced
    assert names(step) == ["model", "model/config.json", "model/model.safetensors", STATE_FILE]
    (step / "model" / "notes.txt").write_text("mine")
    with pytest.raises(MinibertError, match="step-2: .* holds model/notes.txt"):
        save(step)
    assert (step / "model" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# kill -9 at random moments of `convert_weights.py --overwrite`

CONVERT_LOOP = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import minibert.safe_write
if {fallback}:
    minibert.safe_write._exchange = lambda a, b: False
from convert_weights import ConvertArgs, convert
sources = {sources!r}
for i in range(10**6):
    convert(ConvertArgs(sources[i % 2], Path({dst!r}), overwrite=True))
    Path({ready!r}).touch()
"""


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "three renames"])
def test_kill_9_during_convert_overwrite_leaves_a_folder_that_loads(tmp_path, fallback):
    """A process converts two checkpoints into DST with --overwrite, over and over; it is
    killed with SIGKILL at seeded random moments. What is left at DST always loads, complete:
    exactly one of the two models."""
    other = tmp_path / "other"
    save_pretrained(tiny(5), other)
    models = {"bert-tiny": read_checkpoint(BERT_TINY)[0], "other": read_checkpoint(other)[0]}
    sources = [str(BERT_TINY), str(other)]
    dst, ready = tmp_path / "out" / "converted", tmp_path / "ready"
    script = CONVERT_LOOP.format(repo=str(REPO), fallback=fallback, sources=sources,
                                 dst=str(dst), ready=str(ready))
    rng = random.Random(11)
    found = set()
    for _ in range(3):
        ready.unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not ready.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), process.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 0.6))
        process.kill()
        process.wait()
        process.stderr.close()
        found.add(which(dst, models))
    assert found <= {"bert-tiny", "other"}
    save_pretrained(tiny(6), dst.parent / "beside")  # the next write tidies the leftovers
    assert hidden_entries(dst.parent) == []
