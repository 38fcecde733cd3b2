"""Leaving a `deepspeed`-launched process cleanly (kept apart from `integration`, which registers fuyou on import)."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed


def end_distributed() -> None:
    """Ends the process group and removes this rank's DeepSpeed shared-memory all-reduce buffer.

    Call it last in a script launched with `deepspeed`. Why: a process that exits with a gloo group still alive can
    abort at interpreter teardown ("terminate called without an active exception": gloo's worker threads outlive
    Python; pytorch/pytorch#179291), and DeepSpeed's CPU all-reduce creates a 66 MiB `/dev/shm` file per rank and
    launch that nothing removes: host memory that stays taken until reboot. Every rank has mapped every other rank's
    file by the end, so unlinking after the barrier cannot starve a peer.
    """
    if not torch.distributed.is_initialized():
        return
    rank = torch.distributed.get_rank()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)
