"""Why a write failed, in one line: a full disk, or a folder that cannot be created or
written. minibert/safe_write.py raises these from its writes; the trainer adds which checkpoint
is the newest complete one.

    raise DiskFullError(target, free=free_space(folder), needed=51_000_000)
    # no space left on the device while writing runs/x/checkpoints/step-4 (about 51 MB
    # needed, 29 MB free)

A full disk. Writers report it in their own ways: an OSError ENOSPC (Python's own files),
safetensors' "No space left on device" in its own exception, torch.save's zip writer an
"unexpected pos" RuntimeError that drops the errno (its cause holds the OSError only when it
writes to a Python file object). So `out_of_space` searches the chain of causes for the errno
or its text, and otherwise takes a filesystem left with (almost) no space as the reason: a
writer fills the disk to its last block before its write fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from .errors import MinibertError

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


def out_of_space(error: BaseException, folder: Path) -> bool:
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


def disk_bytes(path: Path) -> int:
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


def make_folder(folder: str | Path, what: str = "") -> Path:
    """Create `folder` and its parents (nothing if it exists); a one-line MinibertError,
    naming the setting `what` (out_dir, cache_dir) if given, when that is not possible."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(folder, free_space(folder)) from None
        raise MinibertError(f"{what + ' ' if what else ''}{folder}: cannot create it "
                            f"({error.strerror or error})") from None
    return folder
