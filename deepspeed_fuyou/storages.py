"""The private parts of torch's storage API that fuyou relies on, in one place.

Activation offload must know when two saved tensors share memory, and whether anything still holds a storage it has
moved away, without keeping that storage alive itself. torch offers both only through private methods of
`torch.UntypedStorage`; if a torch release renames or changes them, `tests/test_storages.py` fails on exactly the
call that broke, instead of the offloader misbehaving somewhere downstream.
"""

from __future__ import annotations

import torch


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage under `tensor`: the same for every view of it, real or fake, while it lives."""
    return tensor.untyped_storage()._cdata


class WeakStorage:
    """A weak reference to a storage: answers whether anything still holds it, and hands it out if so.

    It reserves the storage's identity, not its memory: the bytes are freed with the storage's last strong
    reference. `free()` must be called once the reference is no longer needed (torch counts weak references too).
    """

    __slots__ = ("_ref",)

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self._ref: int | None = storage._weak_ref()

    def get(self) -> torch.UntypedStorage | None:
        """The storage if anything else still holds it, else None."""
        if self._ref is None or torch.UntypedStorage._expired(self._ref):
            return None
        return torch.UntypedStorage._new_with_weak_ptr(self._ref)  # None if it died since the line above

    def free(self) -> None:
        if self._ref is not None:
            torch.UntypedStorage._free_weak_ref(self._ref)
            self._ref = None
