"""Launching and leaving `deepspeed` processes cleanly (kept apart from `integration`, which registers fuyou on
import).

Two things outlive a rank unless someone removes them: fuyou's swap directories (removed at interpreter exit, see
`swap.runtime`) and DeepSpeed's shared-memory all-reduce buffer, a 66 MiB `/dev/shm` file per rank and launch that
DeepSpeed never removes: host memory that stays taken until reboot. A run that ends normally calls
`exit_distributed`; `clean_up_when_stopped` covers the runs that do not end normally.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import NoReturn

import torch.distributed

_stop_handlers_installed = False


_SHARED_MEMORY = Path("/dev/shm")
_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def _shared_memory_buffer(rank: int | str) -> Path:
    """This rank's DeepSpeed CPU all-reduce buffer, named by user, rendezvous address and port, and global rank."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return _SHARED_MEMORY / f"{_BUFFER_PREFIX}_{os.getuid()}_{address}_{port}_{rank}"


def shared_memory_buffers(port: int | str | None = None) -> list[Path]:
    """The DeepSpeed all-reduce buffers in `/dev/shm` of the launch that met at rendezvous `port` (None: of every
    launch), for whoever launched it to check or remove once its ranks are gone (a killed rank leaves its own)."""
    pattern = f"{_BUFFER_PREFIX}_*" if port is None else f"{_BUFFER_PREFIX}_*_{port}_*"
    return sorted(_SHARED_MEMORY.glob(pattern))


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now, for a launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_distributed() -> NoReturn:
    """Ends the process group, removes this rank's DeepSpeed shared-memory all-reduce buffer, and exits with 0.

    Call it last in a script launched with `deepspeed`. Why exit here: a process whose gloo group ever lived can
    abort at interpreter teardown ("terminate called without an active exception": gloo's worker threads outlive
    Python; pytorch/pytorch#179291), even after `destroy_process_group`, which turns a finished run into exit code
    -6. So the atexit handlers (fuyou's swap-directory removal, pending background steps, logging) run here, the
    standard streams are flushed, and the process leaves without running C++ static destructors.

    Every rank has mapped every other rank's buffer by the end, so unlinking after the barrier cannot starve a peer.
    """
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        _shared_memory_buffer(rank).unlink(missing_ok=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def clean_up_when_stopped() -> None:
    """Makes a rank that is stopped (SIGTERM) or fails (an exception) remove what `exit_distributed` would have.

    The `deepspeed` launcher stops its ranks with SIGTERM (also when it gets Ctrl-C), whose default action ends the
    process on the spot, without atexit. Here SIGTERM becomes a `SystemExit` (and SIGINT stays a
    `KeyboardInterrupt`), so the training loop unwinds and the atexit handlers run: the swap directories go, and so
    does the rank's all-reduce buffer (also after an exception). The first stop signal makes later ones ignored, so
    that a second one cannot cut the clean-up short. A handler the script installed itself is left alone, and so is
    a rank stuck in native code, which only SIGKILL ends: the next run on the same SSD removes its swap directory.

    Called by fuyou's integration when it takes over a run's swapping; installs once per process.
    """
    global _stop_handlers_installed
    if _stop_handlers_installed:
        return
    _stop_handlers_installed = True
    rank = os.environ.get("RANK")
    if rank is not None:
        atexit.register(_shared_memory_buffer(rank).unlink, missing_ok=True)
    if threading.current_thread() is threading.main_thread():  # the only thread that may install handlers
        for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            if signal.getsignal(signum) is default:
                signal.signal(signum, _stop)


def _stop(signum: int, _frame: FrameType | None) -> None:
    for each in (signal.SIGTERM, signal.SIGINT):
        signal.signal(each, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)
