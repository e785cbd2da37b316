"""Writing files and folders so that a crash, a Ctrl-C or a kill -9 never leaves a half-written
one where a reader looks. Everything minibert writes goes through here.

    with atomic_folder("out/bert-tiny", overwrite=True) as tmp:   # a checkpoint folder
        (tmp / "config.json").write_text(...)
    with atomic_file("runs/x/loss.png") as tmp:                    # one file
        figure.savefig(tmp)

How. The new content is written under a hidden temporary name beside the target,
`.NAME.tmp-PID-HOST-XXXXXX`, so that the final rename stays inside one filesystem. Every file
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
A run killed in that window leaves the pieces; the next write beside them, or the next read
of NAME (`recover`), finishes the swap from .new or undoes it from .old.

Moving. `move` renames a file or folder to a new place in one step and fsyncs both parents:
what moves stays whole. A caller that moves several things records its plan first, so that
the next run can finish what a kill interrupted (minibert/resume.py).

A full disk. Writers report it in their own ways (an OSError ENOSPC, safetensors' "No space
left on device", torch's zip writer an "unexpected pos" that drops the errno); a write that
fails on a filesystem with (almost) no space left raises DiskFullError, one line naming the
target, once its temporary is deleted. So does a folder that cannot be created or written.

Leftovers. A hidden name says what it holds: .NAME.tmp-* a write in progress, .NAME.new-* and
.NAME.old-* the halves of a swap, .NAME.del-* a folder being deleted (`remove_folder`). The PID
and host in it tell whether its maker is still running. `recover_and_tidy`, called before every
write, finishes or undoes the swaps and deletes the leftovers of makers that are gone, and
names in a warning those it cannot judge (another machine's, or an older minibert's).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
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

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|new|old|del)-(?P<pid>\d+)-"
                       r"(?P<host>[A-Za-z0-9]*)-[0-9a-f]{6}")
_FOREIGN = re.compile(r"\.(?P<name>.+)\.(tmp|new|old|del)-.+|.+\.\d+\.tmp")  # older names


# A write that failed while the filesystem had less than this left failed for want of space.
# A writer fills the disk to the last block before its write fails, so what is left is below
# one block group, a few KB; 1 MB leaves room for filesystems that keep a reserve.
_FULL_BELOW = 2**20


class DiskFullError(MinibertError):
    """No space left on the device while writing `target`: how much was free, and about how
    much the write needed when the caller knew."""

    def __init__(self, target: str | Path, free: int, needed: int | None = None):
        self.target, self.free, self.needed = Path(target), free, needed
        sizes = f"about {format_size(needed)} needed, " if needed else ""
        super().__init__(f"no space left on the device while writing {target} "
                         f"({sizes}{format_size(free)} free)")


def format_size(size: int) -> str:
    """Bytes as a person reads them: 5.2 kB, 51 MB, 1.3 GB (powers of 1000, as df -H)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.2g} {unit}" if size < 10 * scale else f"{size / scale:.0f} {unit}"
    return f"{size / 1e3:.2g} kB" if size < 1e4 else f"{size / 1e3:.0f} kB"


def free_space(folder: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of `folder` (its nearest
    existing ancestor); 0 when that cannot be read."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a write into `folder` failed for want of space (its temporary still there)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, DiskFullError) or (isinstance(seen, OSError) and seen.errno in (
                errno.ENOSPC, errno.EDQUOT)):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, MinibertError):  # a failure that says what it is
        return False
    try:
        return shutil.disk_usage(folder).free < _FULL_BELOW
    except OSError:
        return False


@contextlib.contextmanager
def _space_checked(dst: Path, tmp: Path, needed: int | None) -> Iterator[None]:
    """Turn a failure for want of space while `tmp` is written into a DiskFullError for
    `dst`, once `tmp` is deleted (so that the space it took is counted as free)."""
    try:
        yield
    except Exception as error:
        if not _out_of_space(error, tmp.parent):
            raise
        # What is free once tmp is deleted, counted before: a writer's file that is still
        # open (torch.save's, held by the traceback) keeps its blocks after the deletion.
        free = free_space(dst.parent) + _blocks(tmp)
        _delete(tmp)
        if isinstance(error, DiskFullError) and needed is None:
            needed = error.needed
        raise DiskFullError(dst, free, needed) from None


def _blocks(path: Path) -> int:
    """Bytes the file or folder `path` takes on disk (0 if it is gone)."""
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    total = 0
    for item in paths:
        with contextlib.suppress(OSError):
            total += os.lstat(item).st_blocks * 512
    return total


def check_writable(folder: str | Path, what: str) -> None:
    """Raise a one-line MinibertError unless `folder` is a writable folder or could be created
    as one (its nearest existing ancestor is a writable folder). Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MinibertError(f"{what} {folder}: cannot write there ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MinibertError(f"{what} {folder}: cannot write there ({existing} is not writable)")


def make_folder(folder: str | Path, what: str) -> Path:
    """Create `folder` and its parents (nothing if it exists); a one-line MinibertError
    naming `what` (out_dir, cache_dir) when that is not possible."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(folder, free_space(folder)) from None
        raise MinibertError(f"{what} {folder}: cannot create it "
                            f"({error.strerror or error})") from None
    return folder


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40]


def _aside(dst: Path, kind: str) -> Path:
    """A hidden name beside dst that records who made it: .NAME.KIND-PID-HOST-XXXXXX."""
    return dst.with_name(f".{dst.name}.{kind}-{os.getpid()}-{_host()}-{secrets.token_hex(3)}")


def _writer_is_gone(pid: int, host: str) -> bool | None:
    """True if the process that made a leftover has exited; None if that cannot be known."""
    if host != _host():
        return None
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
            gone = _writer_is_gone(int(match.group("pid")), match.group("host"))
            if gone:
                _delete(path)
            elif gone is None:
                warnings.warn(f"{path}: left by a write on host {match.group('host')}; delete it "
                              f"if nothing writes there", stacklevel=3)
        elif not match and _FOREIGN.fullmatch(path.name):
            warnings.warn(f"{path}: looks like the leftover of an interrupted write; delete it "
                          f"if nothing writes there", stacklevel=3)


def recover(dst: str | Path) -> None:
    """If a swap of `dst` was interrupted (its writer is gone), finish it or undo it."""
    dst = Path(dst)
    if dst.exists():
        return
    pieces: dict[str, list[Path]] = {"new": [], "old": []}
    with contextlib.suppress(OSError):  # no parent, or not readable: nothing to recover
        for path in dst.parent.iterdir():
            match = _LEFTOVER.fullmatch(path.name)
            if (match and match.group("name") == dst.name and match.group("kind") in pieces
                    and _writer_is_gone(int(match.group("pid")), match.group("host"))):
                pieces[match.group("kind")].append(path)
    # A .new folder is complete (it was renamed so only after its fsync): finish the swap.
    # Without one, the swap had only moved the old folder aside: undo that.
    for found in (pieces["new"], pieces["old"]):
        if found:
            with contextlib.suppress(FileNotFoundError):  # another process recovered it first
                os.rename(found[0], dst)
                _fsync_path(dst.parent)
            return


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
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(dst, free_space(dst.parent)) from None
        raise MinibertError(f"{dst}: cannot create its folder ({error.strerror or error})") from None


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
