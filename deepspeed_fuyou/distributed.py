"""Leaving a `deepspeed`-launched process cleanly (kept apart from `integration`, which registers fuyou on import)."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch.distributed


def exit_distributed() -> NoReturn:
    """Ends the process group, removes this rank's DeepSpeed shared-memory all-reduce buffer, and exits with 0.

    Call it last in a script launched with `deepspeed`. Why exit here: a process whose gloo group ever lived can
    abort at interpreter teardown ("terminate called without an active exception": gloo's worker threads outlive
    Python; pytorch/pytorch#179291), even after `destroy_process_group`, which turns a finished run into exit code
    -6. So the atexit handlers (fuyou's swap-directory removal, pending background steps, logging) run here, the
    standard streams are flushed, and the process leaves without running C++ static destructors.

    Why unlink: DeepSpeed's CPU all-reduce creates a 66 MiB `/dev/shm` file per rank and launch that nothing
    removes: host memory that stays taken until reboot. Every rank has mapped every other rank's file by the end,
    so unlinking after the barrier cannot starve a peer.
    """
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
