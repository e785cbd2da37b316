"""Writing files and folders so that a crash, a Ctrl-C or a kill -9 never leaves a half-written
one where a reader looks. Everything minibert writes goes through here.

    with atomic_folder("out/bert-tiny", overwrite=True) as tmp:   # a checkpoint folder
        (tmp / "config.json").write_text(...)
    with atomic_file("runs/x/loss.png") as tmp:                    # one file
        figure.savefig(tmp)

How. The new content is written under a hidden temporary name beside the target,
`.NAME.tmp-PID-HOST-STAMP-XXXXXX`, so that the final rename stays inside one filesystem. Every file
and folder of it is fsynced before the rename makes it visible, and the parent folder after,
so that after a power cut the name points at complete data, never at empty files. The
temporary is created with the default modes (0o777 for folders, 0o666 for files), which the
kernel masks with the user's umask, and set to those modes again before the rename (tempfile's
or safetensors' private 0o700/0o600 would hide a model from a serving container).

Replacing a folder. A file is replaced in one step by rename(2). A folder cannot be: rename
refuses a non-empty target. On Linux, renameat2(RENAME_EXCHANGE) swaps the two names in one
step, so DST is at every instant the complete old folder or the complete new one; the old one
then sits under the temporary name and is deleted. Where that call is missing (other systems,
some filesystems) the swap takes three renames with a window in which DST is absent:
    .NAME.tmp-*  -> .NAME.new-*   (the new folder is complete)
    NAME         -> .NAME.old-*
    .NAME.new-*  -> NAME
A run killed in that window leaves the pieces; the next write beside them (`recover`)
finishes the swap from .new or undoes it from .old, and a read of NAME meanwhile reads the
complete side (`readable`, below).

Moving. `move` renames a file or folder to a new place in one step and fsyncs both parents:
what moves stays whole. A caller that moves several things records its plan first, so that
the next run can finish what a kill interrupted (minibert/resume.py).

A full disk. A write that fails for want of space raises DiskFullError, one line naming the
target, how much was free and about how much it needed, once its temporary is deleted; a
folder that cannot be created is one line too (minibert/write_errors.py).

Leftovers. A hidden name says what it holds: .NAME.tmp-* a write in progress, .NAME.new-* and
.NAME.old-* the halves of a swap, .NAME.del-* a folder being deleted (`remove_folder`). The PID,
host and STAMP in it tell whether its maker is still running. PID and host alone cannot: a
restarted container comes back with the same host name and the same PIDs (often 1). STAMP is a
hash of the boot id (/proc/sys/kernel/random/boot_id) and of the process's start time
(/proc/PID/stat), which a reboot or a restart changes: a leftover is its maker's while a
process with its PID runs and has its stamp. Where /proc is missing, names have no STAMP
(.NAME.tmp-PID-HOST-XXXXXX, as older minibert wrote them) and the PID alone is judged.
`recover_and_tidy`, called before every write, finishes or undoes the swaps and deletes the
leftovers of makers that are gone, and names in a warning those it cannot judge (another
machine's, or an older minibert's).

Reading never writes. A reader that finds NAME missing and the halves of an interrupted swap
beside it (`readable`) reads the complete side, .NAME.new-* (the folder the swap was putting in
place, complete before it was renamed so) or else .NAME.old-* (the folder it was replacing),
and fixes nothing: the next write beside them finishes or undoes the swap. So a checkpoint on
read-only storage reads as it would anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import warnings
from pathlib import Path
from typing import Iterator

from .errors import MinibertError
from .write_errors import DiskFullError, disk_bytes, free_space, make_folder, out_of_space

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|new|old|del)-(?P<pid>\d+)-"
                       r"(?P<host>[A-Za-z0-9]*)(?:-(?P<stamp>[0-9a-f]{8}))?-[0-9a-f]{6}")
_PROC = Path("/proc")  # Linux's view of processes; where it is missing names carry no stamp
_FOREIGN = re.compile(r"\.(?P<name>.+)\.(tmp|new|old|del)-.+|.+\.\d+\.tmp")  # older names


@contextlib.contextmanager
def _space_checked(dst: Path, tmp: Path, needed: int | None) -> Iterator[None]:
    """Turn a failure for want of space while `tmp` is written into a DiskFullError for
    `dst`, once `tmp` is deleted (so that the space it took is counted as free)."""
    try:
        yield
    except Exception as error:
        if not out_of_space(error, tmp.parent):
            raise
        # What is free once tmp is deleted, counted before: a writer's file that is still
        # open (torch.save's, held by the traceback) keeps its blocks after the deletion.
        free = free_space(dst.parent) + disk_bytes(tmp)
        _delete(tmp)
        if isinstance(error, DiskFullError) and needed is None:
            needed = error.needed
        raise DiskFullError(dst, free, needed) from None


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40]


def _stamp(pid: int) -> str | None:
    """8 hex digits that a reboot or a restart changes: a hash of the boot id and of the start
    time of process `pid` (in clock ticks since boot), or None where /proc cannot tell (no such
    process, or no /proc)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces
    except (OSError, IndexError):
        return None
    try:
        boot = (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        boot = ""  # a start time alone still tells a restarted container's PID 1 from ours
    return hashlib.sha256(f"{boot} {start}".encode()).hexdigest()[:8]


def _aside(dst: Path, kind: str) -> Path:
    """A hidden name beside dst that records who made it: .NAME.KIND-PID-HOST-STAMP-XXXXXX
    (without -STAMP where /proc is missing)."""
    pid = os.getpid()
    stamp = _stamp(pid)
    maker = f"{pid}-{_host()}" + (f"-{stamp}" if stamp else "")
    return dst.with_name(f".{dst.name}.{kind}-{maker}-{secrets.token_hex(3)}")


def _writer_is_gone(pid: int, host: str, stamp: str | None) -> bool | None:
    """True if the process that made a leftover has exited; None if that cannot be known."""
    if host != _host():
        return None
    if stamp is not None and (now := _stamp(pid)) is not None:
        return now != stamp  # a process with that PID runs: the maker only if it has its stamp
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_and_tidy(parent: str | Path) -> None:
    """Finish or undo the interrupted swaps in `parent` (`recover`) and delete the leftovers of
    writers that are gone; warn about leftovers whose writer cannot be judged."""
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in {m.group("name") for p in entries if (m := _LEFTOVER.fullmatch(p.name))}:
        recover(parent / name)
    for path in entries:
        match = _LEFTOVER.fullmatch(path.name)
        if match and path.exists():
            gone = _writer_is_gone(int(match.group("pid")), match.group("host"),
                                   match.group("stamp"))
            if gone:
                _delete(path)
            elif gone is None:
                warnings.warn(f"{path}: left by a write on host {match.group('host')}; delete it "
                              f"if nothing writes there", stacklevel=3)
        elif not match and _FOREIGN.fullmatch(path.name):
            warnings.warn(f"{path}: looks like the leftover of an interrupted write; delete it "
                          f"if nothing writes there", stacklevel=3)


def _swap_halves(dst: Path, writer_gone: bool) -> list[Path]:
    """The halves of an interrupted swap of `dst`, the complete side first: .new folders (a
    .new folder is complete: it was renamed so only after its fsync), then .old ones (without a
    .new, the swap had only moved the old folder aside). With writer_gone, only those whose
    writer is known to be gone."""
    halves: dict[str, list[Path]] = {"new": [], "old": []}
    with contextlib.suppress(OSError):  # no parent, or not readable: no halves to be found
        for path in sorted(dst.parent.iterdir()):
            match = _LEFTOVER.fullmatch(path.name)
            if (match and match.group("name") == dst.name and match.group("kind") in halves
                    and (not writer_gone or _writer_is_gone(
                        int(match.group("pid")), match.group("host"), match.group("stamp")))):
                halves[match.group("kind")].append(path)
    return halves["new"] + halves["old"]


def recover(dst: str | Path) -> None:
    """If a swap of `dst` was interrupted (its writer is gone), finish it from the .new half or
    undo it from the .old one. Writers call it (`recover_and_tidy`); readers use `readable`."""
    dst = Path(dst)
    if dst.exists():
        return
    halves = _swap_halves(dst, writer_gone=True)
    if halves:
        with contextlib.suppress(FileNotFoundError):  # another process recovered it first
            os.rename(halves[0], dst)
            _fsync_path(dst.parent)


def readable(dst: str | Path) -> Path:
    """What a reader of `dst` reads, writing nothing: `dst`, or where `dst` is missing because a
    swap of it was interrupted, the complete side of that swap (the .new folder, else the .old
    one), left as it is for the next write beside it to finish (`recover_and_tidy`). Any
    writer's halves count: a .new folder is complete whoever made it."""
    dst = Path(dst)
    if dst.exists():
        return dst
    halves = _swap_halves(dst, writer_gone=False)
    return halves[0] if halves else dst


@contextlib.contextmanager
def atomic_folder(dst: str | Path, overwrite: bool = False,
                  needed: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dst`; when the block ends without an error,
    make it `dst` (replacing an existing `dst` only with overwrite), else delete it. `needed`:
    about how many bytes it will hold, for the DiskFullError of a full disk."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise MinibertError(f"{dst}: already exists (choose a new folder or pass --overwrite)")
    _make_parent(dst)
    recover_and_tidy(dst.parent)
    tmp = _aside(dst, "tmp")
    try:
        with _space_checked(dst, tmp, needed):
            os.mkdir(tmp)  # mode 0o777 less the umask
            yield tmp
            _fsync_tree(tmp)
        with _signals_deferred():
            if not dst.exists():
                os.rename(tmp, dst)
            elif _exchange(tmp, dst):
                pass  # dst is the new folder, tmp the old one (deleted below)
            else:
                new, old = _aside(dst, "new"), _aside(dst, "old")
                os.rename(tmp, new)
                os.rename(dst, old)
                os.rename(new, dst)
                tmp = old
            _fsync_path(dst.parent)
    finally:
        _delete(tmp)


@contextlib.contextmanager
def atomic_file(dst: str | Path, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dst` to write; when the block ends without an error,
    rename it over `dst` in one step, else delete it. `needed`: about how many bytes it will
    hold, for the DiskFullError of a full disk."""
    dst = Path(dst)
    _make_parent(dst)
    recover_and_tidy(dst.parent)
    tmp = _aside(dst, "tmp")
    try:
        with _space_checked(dst, tmp, needed):
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync_path(tmp)
        os.replace(tmp, dst)
        _fsync_path(dst.parent)
    finally:
        _delete(tmp)


def write_text(dst: str | Path, text: str) -> None:
    """Replace the file `dst` with `text` (UTF-8) atomically."""
    with atomic_file(dst) as tmp:
        tmp.write_text(text, encoding="utf-8")


def move(src: str | Path, dst: str | Path) -> None:
    """Rename the file or folder `src` to `dst` (on the same filesystem) in one step, and make
    the rename durable: both parent folders are fsynced. `dst` must not exist; its parent is
    created."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise MinibertError(f"cannot move {src} to {dst}: it exists")
    _make_parent(dst)
    os.rename(src, dst)
    _fsync_path(dst.parent)
    _fsync_path(src.parent)


def _make_parent(dst: Path) -> None:
    make_folder(dst.parent)


def remove_folder(path: str | Path) -> None:
    """Delete a folder so that no reader ever sees it half-deleted: rename it aside in one
    step, then delete it (a kill in between leaves a .del leftover that `recover_and_tidy`
    removes)."""
    path = Path(path)
    if not path.exists():
        return
    aside = _aside(path, "del")
    os.rename(path, aside)
    _fsync_path(path.parent)
    _delete(aside)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Give every file and folder the modes the umask implies (some writers, such as
    safetensors, create private 0o600 files), then fsync every file and every folder, deepest
    first, so that all of it is on disk."""
    umask = _umask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(Path(folder, name), 0o666 & ~umask)
            _fsync_path(Path(folder, name))
        os.chmod(folder, 0o777 & ~umask)
        _fsync_path(Path(folder))


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(umask)
    return umask


@functools.cache
def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names a and b in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the filesystem does not offer it."""
    function = _renameat2()
    if function is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the names are swapped, then deliver them: a Python signal
    handler (KeyboardInterrupt) cannot then fire between two renames. Only the main thread can
    install handlers; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not None}  # None: a handler set outside Python
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            # The handler is called here rather than the signal raised again: a second delivery
            # would count as a second signal for minibert/stopping.py's watchdog.
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)
