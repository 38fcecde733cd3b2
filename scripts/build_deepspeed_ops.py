"""Builds the DeepSpeed C++ ops that training loads, once, at install time instead of inside the first training run.

DeepSpeed compiles its ops (CPU Adam, async I/O, the shared-memory all-reduce, ...) on first use, under a lock
file in torch's extension cache. A process killed while compiling (a launcher stopping its other ranks, a timeout,
Ctrl-C) leaves that lock behind, and every later run then waits on it forever. Building here, with nothing able to
kill the build half-way, keeps compilation out of training runs; a lock that no running build holds is removed
first, with a message.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.utils.cpp_extension

# The builders our training path, stock ZeRO-3 offload and the tests load on either accelerator.
OPS = ("CPUAdamBuilder", "AsyncIOBuilder", "ShareMemCommBuilder", "PinMemoryBuilder", "FusedAdamBuilder")
# A lock this young may belong to a build that is writing its ninja file or loading its result (the moments when
# no compiler runs in the op's folder); older, with no compiler there, its build is gone.
STALE_LOCK_SECONDS = 60


def extension_cache() -> Path:
    """Where torch keeps JIT-built extensions (one folder per Python and accelerator, one per op below it)."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or torch.utils.cpp_extension.get_default_build_root())


def build_running_in(folder: Path) -> bool:
    """Whether any process works in `folder`: torch runs ninja, and ninja the compiler, with the op's folder as cwd."""
    for proc in Path("/proc").iterdir():
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:  # not a process, gone meanwhile, or not ours to inspect
            continue
        if cwd == folder or folder in cwd.parents:
            return True
    return False


def remove_stale_locks(cache: Path) -> None:
    """Removes every lock whose build was killed, so that no later run waits on it forever."""
    for lock in cache.glob("**/lock"):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_SECONDS and not build_running_in(lock.parent.resolve()):
            print(f"build_deepspeed_ops: removing {lock}, left {age:.0f} s ago by a build that was killed")
            lock.unlink(missing_ok=True)


def main() -> None:
    # Imported here: the test session's start-up clears stale locks without paying for DeepSpeed's import.
    from deepspeed.accelerator import get_accelerator

    remove_stale_locks(extension_cache())
    accelerator = get_accelerator()
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"build_deepspeed_ops: {name} does not apply to the {accelerator.device_name()} accelerator")
            continue
        started = time.monotonic()
        builder.load(verbose=False)
        print(f"build_deepspeed_ops: {builder.name} ready ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
