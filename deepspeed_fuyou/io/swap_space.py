"""Where swap files live: a private directory of ours under each SSD path, removed when we are done.

Stock ZeRO-Infinity writes into fixed folders under nvme_path, and each swapper deletes the folder of the one
before it. Ours is one fresh directory per SwapSpace (mode 0700, files 0600), removed on close(), at garbage
collection, or at interpreter exit; directories left behind by processes that were killed are removed the next
time a SwapSpace is made on the same path.

A directory's owner holds an exclusive `flock` on the directory itself for as long as it lives; the kernel drops
it when the owner dies, however it dies. That is the only proof of death that holds for a job in another PID
namespace (a second container on the same SSD), where the PID in a directory's name means nothing. A directory is
locked under a hidden name and only then renamed to the name the clean-up looks for, so no other job can see it
unlocked.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import shutil
import stat
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

from deepspeed_fuyou.errors import FuyouConfigError

log = logging.getLogger(__name__)

_PREFIX = "fuyou-swap-"
_UNLOCKED_PREFIX = ".fuyou-new-"  # not matched by the clean-up: a directory is still unlocked under this name


def _make_owned_directory(root: Path, field: str) -> tuple[Path, int]:
    """A fresh swap directory under `root`, locked by this process: keep the descriptor open while it is in use.

    Without the lock other jobs would take the directory for abandoned, so a file system that refuses locks is
    refused, and the directory removed.
    """
    unlocked = Path(tempfile.mkdtemp(prefix=f"{_UNLOCKED_PREFIX}{os.getpid()}-", dir=root))
    fd = os.open(unlocked, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh directory: nobody else can hold it
    except OSError as err:
        os.close(fd)
        unlocked.rmdir()
        raise FuyouConfigError(
            field,
            str(root),
            f"its file system refuses file locks ({err.strerror}), which mark the swap directory as in use",
            "put swap files on a local file system (ext4, xfs) of the SSD",
        ) from None
    directory = root / (_PREFIX + unlocked.name[len(_UNLOCKED_PREFIX) :])
    os.rename(unlocked, directory)  # the lock belongs to the directory, not to its name
    return directory, fd


def _release(dirs: list[Path], owner_fds: list[int]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    for fd in owner_fds:
        os.close(fd)


def _remove_if_abandoned(entry: Path) -> None:
    fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # its owner is alive, whichever PID namespace it runs in
    else:
        log.info("fuyou: removing swap directory %s of a process that is gone", entry)
        shutil.rmtree(entry, ignore_errors=True)
    finally:
        os.close(fd)


def _remove_stale(root: Path) -> None:
    """Removes the swap directories whose owners are gone (killed before they could clean up)."""
    for entry in root.glob(f"{_PREFIX}*"):
        try:
            _remove_if_abandoned(entry)
        except OSError:  # removed meanwhile by its owner or by another job's clean-up, or not ours to inspect
            continue


def check_swap_root(root: str | os.PathLike, field: str) -> Path:
    """The directory `root` if it exists and files can be created in it; otherwise a FuyouConfigError naming `field`.

    Writability is tried, not read from the mode bits: root passes every permission check, yet cannot write to a
    read-only file system.
    """
    path = Path(root)
    try:
        is_directory = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        raise FuyouConfigError(
            field, str(root), "does not exist", f"create it (mkdir -p {root}) or choose another directory"
        ) from None
    except (OSError, ValueError) as err:  # a symlink loop, a name too long, a NUL byte, a component not a directory
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise FuyouConfigError(
            field, str(root), f"cannot be used as a directory ({reason})", "give an existing directory on an SSD"
        ) from None
    if not is_directory:
        raise FuyouConfigError(field, str(root), "is a file, not a directory", "give a directory on an SSD")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise FuyouConfigError(
            field,
            str(root),
            f"files cannot be created there ({err.strerror})",
            "make it writable by this user, or choose a directory on a writable SSD",
        ) from None
    return path


def supports_o_direct(root: Path) -> bool:
    """Whether an aligned O_DIRECT write works in `root` (tmpfs, some network and FUSE file systems refuse it)."""
    fd, name = tempfile.mkstemp(dir=root, prefix=".fuyou-probe-")
    os.close(fd)
    try:
        direct = os.open(name, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return False
    finally:
        os.unlink(name)
    try:
        with mmap.mmap(-1, 4096) as aligned:  # page-aligned, as O_DIRECT requires
            os.write(direct, aligned)
        return True
    except OSError:
        return False
    finally:
        os.close(direct)


class SwapSpace:
    """One private directory per SSD path; `files(name)` gives the stripe members of a logical file."""

    def __init__(self, roots: Sequence[str | os.PathLike], field: str) -> None:
        """`field`: the setting the roots came from (a JSON path, an argument), which errors name."""
        if not roots:
            raise FuyouConfigError(field, [], "no swap directory given", "list at least one directory on an SSD")
        checked = [check_swap_root(root, f"{field}[{i}]") for i, root in enumerate(roots)]
        self.dirs: list[Path] = []
        owner_fds: list[int] = []
        self._finalizer = weakref.finalize(self, _release, self.dirs, owner_fds)
        try:
            for i, root in enumerate(checked):
                _remove_stale(root)
                directory, owner_fd = _make_owned_directory(root, f"{field}[{i}]")
                owner_fds.append(owner_fd)
                self.dirs.append(directory)
        except BaseException:
            self._finalizer()  # the directories made before the failure
            raise

    def files(self, name: str) -> list[str]:
        """The paths that hold logical file `name`, one per directory, in stripe order."""
        return [str(d / name) for d in self.dirs]

    def close(self) -> None:
        """Removes every directory and the files in it."""
        self._finalizer()

    def __enter__(self) -> SwapSpace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
