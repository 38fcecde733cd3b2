"""The shim over torch's private storage API (`deepspeed_fuyou.storages`): what activation offload relies on."""

from __future__ import annotations

import gc

import torch

from deepspeed_fuyou.storages import WeakStorage, storage_key


def test_views_of_one_storage_share_a_key_and_other_storages_do_not() -> None:
    base = torch.arange(16.0)
    assert storage_key(base) == storage_key(base[4:]) == storage_key(base.view(4, 4).t())
    assert storage_key(base) != storage_key(base.clone())


def test_a_weak_storage_hands_out_the_storage_while_something_holds_it_and_none_after() -> None:
    tensor = torch.arange(8.0)
    weak = WeakStorage(tensor.untyped_storage())
    alive = weak.get()
    assert alive is not None and alive.data_ptr() == tensor.data_ptr() and alive.nbytes() == tensor.nbytes
    del alive, tensor
    gc.collect()
    assert weak.get() is None
    weak.free()
    weak.free()  # once is enough; twice does nothing
    assert weak.get() is None


def test_a_weak_storage_does_not_keep_the_memory_alive() -> None:
    tensor = torch.empty(1 << 20, dtype=torch.uint8)
    weak = WeakStorage(tensor.untyped_storage())
    key = storage_key(tensor)
    del tensor
    assert weak.get() is None
    assert isinstance(key, int)
    weak.free()
