"""Where the bytes of one saved storage are: the states of an offloaded record and the one path through them.

A record starts `KEPT` (on its device, where small records and the kept layers stay) and, once the offloader
decides to move it, walks one path whose shape depends only on the tier and on whether its device is a GPU:

    cpu tier, GPU:        KEPT -> COPYING -> STORED -> UPLOADING -> RESTORED
    cpu tier, host:       KEPT -> STORED -> RESTORED                     (the copy is the whole transfer)
    nvme tier, GPU:       KEPT -> COPYING -> WRITING -> STORED -> READING -> UPLOADING -> RESTORED
    nvme tier, host:      KEPT -> WRITING -> STORED -> READING -> RESTORED   (the engine reads the tensor's memory)

A state in `IN_FLIGHT` ends when its transfer does; `STORED` ends when backward asks for the bytes; `RESTORED` is
the end. Any transfer that fails leaves the record `FAILED`, which nothing can unpack.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Literal


class Where(Enum):
    KEPT = auto()  # on its device, not moved
    COPYING = auto()  # device -> pinned host copy in flight
    WRITING = auto()  # host -> SSD write in flight
    STORED = auto()  # off the device: a host copy (cpu tier) or bytes on the SSD (nvme tier)
    READING = auto()  # SSD -> host read in flight
    UPLOADING = auto()  # host -> device copy in flight
    RESTORED = auto()  # back on the device, for backward
    FAILED = auto()  # a transfer failed: the bytes are lost


IN_FLIGHT = frozenset({Where.COPYING, Where.WRITING, Where.READING, Where.UPLOADING})


def successor(state: Where, tier: Literal["cpu", "nvme"], on_gpu: bool) -> Where:
    """The state a record in `state` moves to next (see the module's docstring); ValueError from the end states."""
    if state is Where.KEPT:
        if on_gpu:
            return Where.COPYING
        return Where.STORED if tier == "cpu" else Where.WRITING
    if state is Where.COPYING:
        return Where.STORED if tier == "cpu" else Where.WRITING
    if state is Where.WRITING:
        return Where.STORED
    if state is Where.STORED:
        if tier == "nvme":
            return Where.READING
        return Where.UPLOADING if on_gpu else Where.RESTORED
    if state is Where.READING:
        return Where.UPLOADING if on_gpu else Where.RESTORED
    if state is Where.UPLOADING:
        return Where.RESTORED
    raise ValueError(f"a record {state.name} goes nowhere")
