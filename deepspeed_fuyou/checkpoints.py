"""Crash-consistent checkpoint directories: a checkpoint is either complete or not there under its name.

DeepSpeed saves a checkpoint into `save_dir/tag` file by file and then writes `save_dir/latest`; a process killed in
between leaves a half-written `tag` directory, which the next save of that tag trips over (its copy of the
offloaded optimizer state refuses an existing folder) and which a load takes for a checkpoint. Under fuyou the
save goes to `partial_tag(tag)` instead; once every rank has written its part, `commit` flushes every file to the
disk, marks the directory complete, renames it to `tag` and only then points `latest` at it (written under another
name and renamed: never half a tag). A kill at any moment leaves `latest` on the previous complete checkpoint, and
`check_complete` refuses a directory without the mark.

The renames and `latest` are done by the rank that DeepSpeed lets create the directory (the first rank of the
node with node-local storage, else the first of the job), after DeepSpeed's own barrier at the end of its save.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deepspeed_fuyou.errors import FuyouIOError

COMPLETE = "fuyou-complete"  # the mark file of a committed checkpoint directory
PARTIAL_SUFFIX = ".fuyou-partial"
LATEST = "latest"  # DeepSpeed's name for the file that holds the tag to load by default


def partial_tag(tag: str) -> str:
    """The name under which the checkpoint `tag` is written until it is complete."""
    return tag + PARTIAL_SUFFIX


def remove_partial(save_dir: str | os.PathLike, tag: str) -> None:
    """Removes what an interrupted save of `tag` left behind, so that this save starts from nothing."""
    shutil.rmtree(Path(save_dir) / partial_tag(tag), ignore_errors=True)


def commit(save_dir: str | os.PathLike, tag: str, save_latest: bool) -> None:
    """Makes the finished `partial_tag(tag)` the checkpoint `tag`: durable, marked, renamed, then `latest`."""
    root = Path(save_dir)
    partial = root / partial_tag(tag)
    for directory, _, files in os.walk(partial):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))
    (partial / COMPLETE).write_text(tag)
    _fsync(partial / COMPLETE)
    _fsync(partial)
    target = root / tag
    if target.exists():  # a complete checkpoint of the same tag, saved again: the new one replaces it
        replaced = root / (tag + ".fuyou-replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        target.rename(replaced)
        partial.rename(target)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        partial.rename(target)
    _fsync(root)
    if save_latest:
        staged = root / (LATEST + PARTIAL_SUFFIX)
        staged.write_text(tag)
        _fsync(staged)
        staged.rename(root / LATEST)
        _fsync(root)


def latest_tag(load_dir: str | os.PathLike) -> str | None:
    """The tag `latest` names in `load_dir`, None if there is no `latest`."""
    path = Path(load_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def complete_tags(load_dir: str | os.PathLike) -> list[str]:
    """The complete checkpoints in `load_dir`, oldest first."""
    marks = Path(load_dir).glob(f"*/{COMPLETE}")
    return [mark.parent.name for mark in sorted(marks, key=lambda mark: mark.stat().st_mtime)]


def check_complete(load_dir: str | os.PathLike, tag: str) -> None:
    """Raises FuyouIOError unless `load_dir/tag` is a checkpoint that `commit` finished."""
    directory = Path(load_dir) / tag
    if (directory / COMPLETE).is_file():
        return
    complete = complete_tags(load_dir)
    fix = (
        f"load the newest complete one: load_checkpoint({str(load_dir)!r}, tag={complete[-1]!r}) "
        f"(complete here: {', '.join(complete)})"
        if complete
        else "no complete checkpoint is left in that directory: start the run again without loading"
    )
    reason = "checkpoint is incomplete (its save was cut off)" if directory.exists() else "checkpoint does not exist"
    raise FuyouIOError(str(directory), 0, 0, None, reason, fix)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
