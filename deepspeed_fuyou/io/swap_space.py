"""Where swap files live: a private directory of ours under each SSD path, removed when we are done.

Stock ZeRO-Infinity writes into fixed folders under nvme_path, and each swapper deletes the folder of the one
before it. Ours is one fresh directory per SwapSpace (mode 0700, files 0600), removed on close(), at garbage
collection, or at interpreter exit; directories left behind by processes that were killed are removed the next
time a SwapSpace is made on the same path.
"""

from __future__ import annotations

import logging
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
    """The directory `root` if it exists and is writable; otherwise a FuyouConfigError naming `field`."""
    path = Path(root)
    if not path.is_dir():
        reason = "is not a directory" if path.exists() else "does not exist"
        raise FuyouConfigError(field, str(root), reason, f"create it (mkdir -p {root}) or choose another directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise FuyouConfigError(
            field, str(root), "is not writable by this user", "fix its permissions or choose another directory"
        )
    return path


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
