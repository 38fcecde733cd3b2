"""The DRAM tier: swap files kept in host memory instead of on the SSD (`fuyou.placement.host_memory`).

Per byte held in host memory, a low-precision parameter partition saves three SSD transfers a step (read in forward,
read again in backward, written after the step), a gradient two (written in backward, read in the step) and an
optimizer sub-group's master weights and states two (read and written in the step). The tier is filled in that
order, each file whole, until its budget is spent; the rest stays on the SSD. Parameters are placed first because
they are made first (`zero.Init` partitions the model before the optimizer exists); the optimizer then places
gradients before any sub-group (`FuyouZeroOptimizer._configure_tensor_swapping`).

A file placed here is a plain host tensor that its swapper uses in place: a parameter partition is what stage 3
gathers from, a sub-group's master and states are what the optimizer steps, a gradient is attached as it is. Nothing
goes through pinned buffers or waits for the SSD, and host memory stays within the budget whatever the model's size.
"""

from __future__ import annotations

import threading


class HostTier:
    """The budget: which files fit is decided here, their tensors belong to the swapper that placed them."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.reserved = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Takes `nbytes` of the budget if they are left (a file kept here whole), else nothing."""
        with self._lock:
            if nbytes <= 0 or self.reserved + nbytes > self.budget:
                return False
            self.reserved += nbytes
            return True
