"""Where swap files live: a private directory of ours under each SSD path, removed when we are done.

Stock ZeRO-Infinity writes into fixed folders under nvme_path, and each swapper deletes the folder of the one
before it. Ours is one fresh directory per SwapSpace (mode 0700, files 0600), removed on close(), at garbage
collection, or at interpreter exit; directories left behind by processes that were killed are removed the next
time a SwapSpace is made on the same path.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

from deepspeed_fuyou.errors import FuyouConfigError

log = logging.getLogger(__name__)

_PREFIX = "fuyou-swap-"


def _remove(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(root: Path) -> None:
    """Removes swap directories of processes that no longer exist (killed before they could clean up)."""
    for entry in root.glob(f"{_PREFIX}*"):
        pid = entry.name[len(_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.info("fuyou: removing stale swap directory %s of a process that is gone", entry)
            shutil.rmtree(entry, ignore_errors=True)


def check_swap_root(root: str | os.PathLike, field: str) -> Path:
    """The directory `root` if it exists and files can be created in it; otherwise a FuyouConfigError naming `field`.

    Writability is tried, not read from the mode bits: root passes every permission check, yet cannot write to a
    read-only file system.
    """
    path = Path(root)
    if path.exists() and not path.is_dir():
        raise FuyouConfigError(field, str(root), "is a file, not a directory", "give a directory on an SSD")
    if not path.exists():
        raise FuyouConfigError(
            field, str(root), "does not exist", f"create it (mkdir -p {root}) or choose another directory"
        )
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

    def __init__(self, roots: Sequence[str | os.PathLike], field: str = "fuyou.nvme_paths") -> None:
        if not roots:
            raise FuyouConfigError(field, [], "no swap directory given", "list at least one directory on an SSD")
        checked = [check_swap_root(root, f"{field}[{i}]") for i, root in enumerate(roots)]
        self.dirs: list[Path] = []
        for root in checked:
            _remove_stale(root)
            self.dirs.append(Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root)))
        self._finalizer = weakref.finalize(self, _remove, list(self.dirs))

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
