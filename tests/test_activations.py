"""Activation offload: same gradients, one write per storage, no reads for live tensors, nothing left behind."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from deepspeed_fuyou import offload_activations
from deepspeed_fuyou.activations import ActivationOffloader, make_offloader, offload_module
from deepspeed_fuyou.activations import offloader as offloader_module
from deepspeed_fuyou.activations.policy import Measurements, layers_to_keep
from deepspeed_fuyou.config.fuyou import ActivationOptions
from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.estimator.model import build_fake_model
from deepspeed_fuyou.io.engine import IOFuture
from tests.estimator_models import FAMILIES, transformers_config


def causal_lm(family: str, layers: int = 3, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    config = transformers_config(family, **{key: layers}, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()


def loss_and_grads(
    model: torch.nn.Module, ids: torch.Tensor, around_forward: contextlib.AbstractContextManager | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout masks in every run (they are saved tensors too)
    with around_forward or contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_bit_identical(expected: tuple[torch.Tensor, list[torch.Tensor]], got: tuple[torch.Tensor, list]) -> None:
    assert torch.equal(expected[0], got[0])
    assert len(expected[1]) == len(got[1])
    for want, have in zip(expected[1], got[1], strict=True):
        assert torch.equal(want, have)


def files_under(offloader: ActivationOffloader) -> list[str]:
    return [name for d in (offloader.space.dirs if offloader.space else []) for name in os.listdir(d)]


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, FAMILIES["llama"]["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gpt_neox", "qwen2"])
@pytest.mark.parametrize("tier", ["nvme", "cpu"])
def test_gradients_with_offload_are_bit_identical_to_gradients_without(
    family: str, tier: str, ids: torch.Tensor, tmp_path: Path
) -> None:
    model = causal_lm(family)
    expected = loss_and_grads(model, ids)
    offloader = make_offloader(model, tier=tier, path=str(tmp_path), offload="all", min_tensor_size=0)
    try:
        for _ in range(2):  # the second pass reuses the offloader: nothing of the first may leak into it
            assert_bit_identical(expected, loss_and_grads(model, ids, offloader))
        assert offloader.stats.offloaded_bytes > 0
        assert offloader.stats.reads > 0
    finally:
        offloader.close()


def test_auto_policy_keeps_the_last_layer_and_moves_the_rest_with_the_same_gradients(
    ids: torch.Tensor, tmp_path: Path
) -> None:
    model = causal_lm("llama", layers=4)
    expected = loss_and_grads(model, ids)
    with contextlib.closing(make_offloader(model, path=str(tmp_path), min_tensor_size=0)) as offloader:
        for _ in range(3):
            assert_bit_identical(expected, loss_and_grads(model, ids, offloader))
        # 4 tiny layers on a CPU: compute is slow next to the disk, so one layer is enough to hide the reads.
        assert offloader.stats.kept_layers == 1
        assert offloader.stats.offloaded_bytes > 0


def test_auto_policy_measures_only_a_forward_that_ran_to_its_end(
    ids: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = causal_lm("llama", layers=4)
    measured: list[Measurements] = []
    monkeypatch.setattr(offloader_module, "layers_to_keep", lambda m: measured.append(m) or layers_to_keep(m))
    third = model.model.layers[2]
    with contextlib.closing(make_offloader(model, path=str(tmp_path), min_tensor_size=0)) as offloader:
        failing = third.register_forward_pre_hook(lambda *_: torch.empty(1 << 62))  # "out of memory" in layer 2
        with pytest.raises(RuntimeError):
            loss_and_grads(model, ids, offloader)
        failing.remove()
        assert measured == []  # layers 2 and 3 never ran: their zero seconds would skew the average
        loss_and_grads(model, ids, offloader)
    assert len(measured) == 1
    assert measured[0].forward_seconds_per_layer > 0
    assert measured[0].offloadable_bytes_per_layer > 0


def test_a_storage_saved_twice_is_written_once(tmp_path: Path) -> None:
    x = torch.randn(256, 1024, requires_grad=True)
    with contextlib.closing(make_offloader(torch.nn.Linear(1, 1), path=str(tmp_path), min_tensor_size=0)) as off:
        with off:
            y = x * 2  # saves nothing: the factor is a Python number
            z = (y * y).sum()  # saves y as both operands: one storage, two saves
        del y  # only the graph's handles refer to it now: backward must read it back
        off.flush()
        z.backward()
        assert (off.stats.saved, off.stats.deduplicated, off.stats.offloaded) == (2, 1, 1)
        assert off.engine.bytes_written == x.numel() * 4
        assert off.stats.reads == 1
    torch.testing.assert_close(x.grad, 8 * x.detach(), rtol=0, atol=0)


def test_a_tensor_still_alive_in_backward_is_forwarded_and_nothing_is_read(tmp_path: Path) -> None:
    x = torch.randn(512, 512, requires_grad=True)
    with contextlib.closing(make_offloader(torch.nn.Linear(1, 1), path=str(tmp_path), min_tensor_size=0)) as off:
        with off:
            hidden = x.sin()  # saves x
            out = hidden.exp()  # saves its output
            loss = (out * hidden).sum()  # saves both operands
        off.flush()  # every write has finished: the handles now hold their storages only weakly
        loss.backward()  # x, hidden and out are all still referenced here
        assert off.stats.offloaded == 3
        assert off.stats.reads == 0
        assert off.stats.forwarded == 4
    leaf = x.detach().requires_grad_()
    hidden = leaf.sin()
    (hidden.exp() * hidden).sum().backward()
    assert torch.equal(x.grad, leaf.grad)


def test_after_backward_no_file_buffer_or_record_is_left(ids: torch.Tensor, tmp_path: Path) -> None:
    model = causal_lm("gpt2")
    offloader = make_offloader(model, path=str(tmp_path), offload="all", min_tensor_size=0)
    try:
        for _ in range(3):
            with offloader:
                loss = model(input_ids=ids, labels=ids).loss
            assert files_under(offloader), "the pass's activations should be on the SSD during the step"
            assert offloader.saved_storages > 0
            loss.backward()
            del loss
            assert files_under(offloader) == []
            assert offloader.stats.resident_bytes == 0
            assert offloader.saved_storages == 0
            assert offloader.transfers_in_flight == 0
    finally:
        offloader.close()


def test_a_graph_dropped_without_backward_releases_its_file(ids: torch.Tensor, tmp_path: Path) -> None:
    model = causal_lm("llama")
    with contextlib.closing(make_offloader(model, path=str(tmp_path), offload="all", min_tensor_size=0)) as off:
        with off:
            loss = model(input_ids=ids, labels=ids).loss
        off.flush()
        del loss
        assert files_under(off) == []
        assert off.stats.resident_bytes == 0


def test_thousands_of_steps_leak_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    batch = torch.randn(32, 64)
    with contextlib.closing(offload_module(model, path=str(tmp_path), offload="all", min_tensor_size=0)) as off:
        for _ in range(2000):
            model(batch).square().mean().backward()
        assert off.stats.offloaded >= 2000 * 2
        assert files_under(off) == []
        assert off.stats.resident_bytes == 0
        assert off.saved_storages == 0


class _LaggingWrite:
    """A write that never reports itself done on its own: only a wait finishes it, as a slow SSD would."""

    def __init__(self, future: object) -> None:
        self._future = future

    def done(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> int:
        return self._future.wait(timeout)


def test_the_last_pass_file_goes_with_its_backward_even_when_its_writes_lag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    with contextlib.closing(offload_module(model, path=str(tmp_path), offload="all", min_tensor_size=0)) as off:
        write = off.engine.write
        monkeypatch.setattr(off.engine, "write", lambda *args, **kwargs: _LaggingWrite(write(*args, **kwargs)))
        loss = model(torch.randn(32, 64)).square().mean()
        assert files_under(off), "the writes are still in flight"
        loss.backward()  # forwards the live tensors: nothing needs the lagging writes any more
        assert files_under(off) == []
        assert off.transfers_in_flight == 0
        assert off.stats.resident_bytes == 0


def test_a_lagging_write_that_fails_after_its_reader_went_still_fails_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    failure = FuyouIOError(str(tmp_path / "activations-0"), 0, 4096, 5, "write failed")
    with contextlib.closing(offload_module(model, path=str(tmp_path), offload="all", min_tensor_size=0)) as off:
        write = off.engine.write

        def failing(*args: object, **kwargs: object) -> _LaggingWrite:
            lagging = _LaggingWrite(write(*args, **kwargs))
            lagging.wait = lambda timeout=None: (_ for _ in ()).throw(failure)
            return lagging

        monkeypatch.setattr(off.engine, "write", failing)
        loss = model(torch.randn(32, 64)).square().mean()
        with pytest.raises(FuyouIOError) as raised:
            loss.backward()  # the last layer's handles go first: its write is finished and fails; the next unpack says
        assert raised.value is failure


def test_full_disk_during_forward_raises_in_that_step_and_no_gradient_is_written(
    ids: torch.Tensor, mounted: object
) -> None:
    tiny = mounted("tmpfs", "size=256k")
    model = causal_lm("llama", layers=2, hidden_size=132, intermediate_size=346)
    offloader = make_offloader(model, path=str(tiny), offload="all", min_tensor_size=0)
    with contextlib.closing(offloader), pytest.raises(FuyouIOError) as raised:
        loss_and_grads(model, ids, offloader)
    assert raised.value.errno == 28  # ENOSPC
    assert "No space left" in str(raised.value)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_offload_composes_with_activation_checkpointing(use_reentrant: bool, ids: torch.Tensor, tmp_path: Path) -> None:
    model = causal_lm("llama", layers=3)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    expected = loss_and_grads(model, ids)
    with contextlib.closing(make_offloader(model, path=str(tmp_path), offload="all", min_tensor_size=0)) as off:
        assert_bit_identical(expected, loss_and_grads(model, ids, off))
        if use_reentrant:  # the checkpoints' inputs are saved under our hooks and moved
            assert off.stats.offloaded_bytes > 0
        assert files_under(off) == []


def test_offload_activations_is_one_offloader_per_model_usable_as_a_decorator(
    ids: torch.Tensor, tmp_path: Path
) -> None:
    model = causal_lm("opt")
    expected = loss_and_grads(model, ids)
    settings = {"path": str(tmp_path), "offload": "all", "min_tensor_size": 0}
    first = offload_activations(model, **settings)
    assert offload_activations(model, **settings) is first

    @offload_activations(model, **settings)
    def forward() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    loss = forward()
    loss.backward()
    assert_bit_identical(expected, (loss.detach(), [p.grad for p in model.parameters()]))
    assert first.offloader.stats.offloaded > 0


def test_parameters_and_their_views_are_never_offloaded(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    x = torch.randn(4, 512)
    with contextlib.closing(make_offloader(model, path=str(tmp_path), offload="all", min_tensor_size=0)) as off:
        with off:
            loss = model(x).sum()
        loss.backward()
        parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
        assert 0 < off.stats.offloaded_bytes < parameter_bytes / 10  # inputs and hidden states only


def test_policy_keeps_more_layers_when_the_tier_is_slow_next_to_compute() -> None:
    fast_disk = Measurements(8, 0.010, 100e6, 20e9, 20e9)
    assert layers_to_keep(fast_disk) == 1
    slow_disk = Measurements(8, 0.010, 100e6, 5e9, 5e9)  # a layer takes 20 ms to write, 10 to compute
    assert layers_to_keep(slow_disk) == 4
    hopeless = Measurements(8, 0.001, 100e6, 1e9, 1e9)
    assert layers_to_keep(hopeless) == 8


def _finished(future: IOFuture) -> IOFuture:
    future.wait()
    return future


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize(("offload", "min_tensor_size", "prefetch_layers"), [("all", 0, 2), ("auto", 64 << 10, 1)])
def test_estimator_predicts_the_moved_bytes_exactly_and_the_device_peak_of_a_real_run(
    family: str, offload: str, min_tensor_size: int, prefetch_layers: int, tmp_path: Path
) -> None:
    model = causal_lm(family, layers=6)
    ids = torch.randint(0, FAMILIES[family]["vocab_size"], (4, 96))
    options = ActivationOptions(offload=offload, min_tensor_size=min_tensor_size, prefetch_layers=prefetch_layers)
    predicted = build_fake_model(model.config).saved_tensors(4, 96)
    settings = {"offload": offload, "min_tensor_size": min_tensor_size, "prefetch_layers": prefetch_layers}
    with contextlib.closing(make_offloader(model, path=str(tmp_path), **settings)) as offloader:
        # The estimate is of a disk that keeps up with the forward: a storage leaves the device as soon as it is
        # saved. On a shared disk under load writes lag and keep their sources resident a while longer (the auto
        # policy's concern, measured separately), so each write here finishes before the forward goes on.
        write = offloader.engine.write
        offloader.engine.write = lambda *args, **kwargs: _finished(write(*args, **kwargs))
        loss_and_grads(model, ids, offloader)
        assert offloader.stats.offloaded_bytes == predicted.offloaded(options)
        peak = offloader.stats.peak_resident_bytes
    assert peak == pytest.approx(predicted.resident_with_offload(options), rel=0.03)
    assert peak < 0.6 * predicted.nbytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tier", ["nvme", "cpu"])
def test_on_cuda_gradients_with_offload_equal_gradients_without(
    tier: str, dtype: torch.dtype, ids: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Side-stream copies, events and `record_stream` on a real device: fp32 bit for bit (deterministic kernels, so
    that the comparison is about the offload, not about atomics), bf16 within its precision."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: deterministic matmuls
    torch.use_deterministic_algorithms(True)
    try:
        model = causal_lm("llama").to("cuda", dtype)
        ids = ids.cuda()
        expected = loss_and_grads(model, ids)
        offloader = make_offloader(model, tier=tier, path=str(tmp_path), offload="all", min_tensor_size=0)
        try:
            got = loss_and_grads(model, ids, offloader)
            assert offloader.stats.offloaded_bytes > 0
        finally:
            offloader.close()
    finally:
        torch.use_deterministic_algorithms(False)
    if dtype == torch.float32:
        assert_bit_identical(expected, got)
    else:
        torch.testing.assert_close(got[0], expected[0], rtol=1.6e-2, atol=1e-2)
        for want, have in zip(expected[1], got[1], strict=True):
            torch.testing.assert_close(have, want, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("tier", ["nvme", "cpu"])
def test_activations_tier_nvme_writes_the_pass_to_files_and_cpu_keeps_it_in_host_memory(
    tier: str, ids: torch.Tensor, tmp_path: Path
) -> None:
    model = causal_lm("gpt2")
    with contextlib.closing(
        make_offloader(model, tier=tier, path=str(tmp_path), offload="all", min_tensor_size=0)
    ) as off:
        with off:
            loss = model(input_ids=ids, labels=ids).loss
        off.flush()
        moved = off.stats.offloaded_bytes
        assert moved > 0
        if tier == "nvme":
            assert off.engine.bytes_written == moved
            assert files_under(off)
        else:
            assert off.engine is None and off.space is None  # no file, no engine: the copies are host memory
        loss.backward()
        assert off.stats.read_bytes > 0


def test_activations_min_tensor_size_leaves_smaller_storages_where_they_are(tmp_path: Path) -> None:
    x = torch.randn(256, 1024, requires_grad=True)  # 1 MiB
    for min_tensor_size, offloaded in (("1MiB", 1), ("2MiB", 0)):
        with contextlib.closing(
            make_offloader(torch.nn.Linear(1, 1), path=str(tmp_path), min_tensor_size=min_tensor_size)
        ) as off:
            with off:
                z = (x.sin() * 2).sum()  # saves x (1 MiB)
            off.flush()
            z.backward()
            assert (off.stats.saved, off.stats.offloaded, off.engine.bytes_written) == (1, offloaded, offloaded << 20)


def reads_started_when_backward_reaches_the_last_layer(
    model: torch.nn.Module, ids: torch.Tensor, path: Path, prefetch_layers: int
) -> int:
    reads: list[int] = []
    with contextlib.closing(
        make_offloader(model, path=str(path), offload="all", min_tensor_size=0, prefetch_layers=prefetch_layers)
    ) as off:

        def watch(module: torch.nn.Module, args: Any, output: Any) -> None:
            first = output[0] if isinstance(output, tuple) else output
            first.register_hook(lambda grad: reads.append(off.stats.reads))

        handle = model.model.layers[-1].register_forward_hook(watch)  # after the offloader's: its hook runs first
        try:
            with off:
                loss = model(input_ids=ids, labels=ids).loss
            off.flush()
            loss.backward()
        finally:
            handle.remove()
    return reads[0]


def test_activations_prefetch_layers_is_how_many_layers_backward_reads_ahead(ids: torch.Tensor, tmp_path: Path) -> None:
    """When backward reaches the last layer, the reads started cover the `prefetch_layers` layers below it (besides the
    head's and the loss's, read as backward used them): each layer more of depth, one layer's reads more."""
    model = causal_lm("llama", layers=6)
    started = {
        depth: reads_started_when_backward_reaches_the_last_layer(model, ids, tmp_path, depth) for depth in (1, 2, 3)
    }
    assert started[2] - started[1] == started[3] - started[2] > 0
