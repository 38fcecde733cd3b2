"""The step-time model (`estimator.step_time`) and the rates it is priced with (`estimator.rates`).

The traffic each overlap mode moves is checked here phase by phase on round numbers, and against what a real run's
swap runtime counted in `tests/test_zero_integration.py`; the modelled times against measured steps are in
benchmarks/RESULTS.md (bench_step.py), not in a test: they depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from deepspeed_fuyou.cli.main import main as fuyou
from deepspeed_fuyou.distributed import shared_memory_buffers
from deepspeed_fuyou.estimator import estimate as estimate_module
from deepspeed_fuyou.estimator import rates as rates_module
from deepspeed_fuyou.estimator.auto import auto_configure
from deepspeed_fuyou.estimator.estimate import Machine, estimate
from deepspeed_fuyou.estimator.rates import ComputeRates, MachineRates, SsdRates, compute_rates, ssd_rates
from deepspeed_fuyou.estimator.step_time import WRITES_QUEUED, StepShape, model_step_time, ssd_seconds
from deepspeed_fuyou.estimator.zero3_probe import split_step
from deepspeed_fuyou.io import IOEngine, IOOptions

GB = 10**9
ROOT = Path(__file__).resolve().parent.parent


def machine_rates(
    read: float = 1.0,
    write: float = 1.0,
    mixed: float = 1.0,
    per_layer: float = 0.1,
    cpu_read: float = 0.0,
    cpu_written: float = 0.0,
) -> MachineRates:
    """SSD rates in GB/s and the engine's host CPU seconds per GB each way; every phase's compute `per_layer`
    seconds a layer, none for the rest."""
    compute = ComputeRates(per_layer, 0.0, 2 * per_layer, 0.0, per_layer / 2, 0.0)
    return MachineRates(SsdRates(read * GB, write * GB, mixed * GB, cpu_read / GB, cpu_written / GB), compute)


def shape(**changes: object) -> StepShape:
    """One GB of parameters (half of them still gathered when backward starts), 1 of gradients, 3 of optimizer
    states, 10 layers, 4 sub-groups, one micro-step, on a GPU."""
    values = dict(
        parameters=GB,
        gradients=GB,
        optimizer_states=3 * GB,
        parameters_in_masters=0,
        retained=GB // 2,
        read_ahead_gradients=0,
        read_ahead_states=0,
        written_behind_states=0,
        activations=0,
        layers=10,
        sub_groups=4,
        micro_steps=1,
        overlap="off",
        accelerator_is_host=False,
    )
    return StepShape(**(values | changes))


def traffic(step) -> dict[str, tuple[int, int]]:
    return {phase.name: (phase.read_bytes, phase.written_bytes) for phase in step.phases if phase.name != WRITES_QUEUED}


def test_off_steps_after_backward_and_sends_the_gradients_through_the_ssd() -> None:
    step = model_step_time(shape(), machine_rates())
    assert traffic(step) == {
        "forward 1": (GB, 0),
        "backward 1": (GB // 2, GB),  # the parameters not retained; the gradients written
        "optimizer": (4 * GB, 4 * GB),  # states and gradients in; states and updated parameters out
    }
    # backward: 2 s of compute against 0.5 GB of reads; the optimizer: 4 GB of reads at 1 GB/s
    assert [phase.bound_by for phase in step.phases[1:]] == ["compute", "SSD", "SSD"]
    assert step.bound_seconds == pytest.approx(10.5) and step.bottleneck == "SSD"  # 5.5 GB read + 5 GB written
    assert step.phases[-1].name == WRITES_QUEUED and step.phases[-1].seconds == pytest.approx(10.5 - 7.0)
    assert step.seconds == pytest.approx(10.5)  # the SSD busy the whole step


def test_backward_mode_keeps_the_gradients_and_steps_all_but_the_last_sub_group_during_backward() -> None:
    step = model_step_time(shape(overlap="backward", gradients=0), machine_rates())
    assert traffic(step) == {
        "forward 1": (GB, 0),
        "backward 1": (GB // 2 + 3 * 3 * GB // 4, 3 * 4 * GB // 4),
        "exposed optimizer": (3 * GB // 4, GB),
    }
    assert step.read_bytes + step.written_bytes == 1.5 * GB + 7 * GB  # no gradient moves at all


def test_forward_mode_steps_behind_the_next_forward_which_waits_for_the_first_sub_groups_update() -> None:
    step = model_step_time(shape(overlap="forward"), machine_rates())
    forward, backward = step.phases[:2]
    assert (forward.read_bytes, forward.written_bytes) == (4 * GB, 4 * GB)  # the step's bytes; no parameter read
    assert forward.optimizer_s == pytest.approx(0.5)
    assert forward.waits_s == pytest.approx(1.0 + 0.125)  # a quarter of the states and gradients read, its Adam
    assert (backward.read_bytes, backward.written_bytes) == (GB // 2, GB)
    fast_disk = model_step_time(shape(overlap="forward"), machine_rates(read=100, write=100, mixed=100))
    assert fast_disk.phases[0].seconds == pytest.approx(0.01 + 0.125 + 1.0)  # the wait, then the compute
    read_ahead = model_step_time(
        shape(overlap="forward", read_ahead_states=3 * GB // 4, read_ahead_gradients=GB // 4), machine_rates()
    )
    assert read_ahead.phases[0].waits_s == pytest.approx(0.125)  # the first sub-group was read during backward
    host = model_step_time(shape(overlap="forward", accelerator_is_host=True), machine_rates())
    assert host.phases[0].waits_s == pytest.approx(1.0)  # its Adam runs on the cores the phase counts already


def test_parameters_stored_in_their_masters_are_written_once_with_the_master() -> None:
    step = traffic(model_step_time(shape(parameters_in_masters=GB), machine_rates()))
    assert step["optimizer"] == (4 * GB, 3 * GB)  # the updated parameters are part of the masters' write
    assert step["forward 1"] == (GB, 0)  # and are read as before, from the masters' files


def test_gradient_accumulation_reads_back_the_gradients_it_adds_to() -> None:
    off = traffic(model_step_time(shape(micro_steps=2), machine_rates()))
    assert off["backward 1"] == (GB // 2, GB) and off["backward 2"] == (GB // 2 + GB, GB)
    assert off["forward 1"] == (GB, 0)  # after a step every partition is new: all of them are read
    assert off["forward 2"] == (GB // 2, 0)  # between micro-steps what backward left in memory is not
    backward = traffic(model_step_time(shape(micro_steps=2, overlap="backward"), machine_rates()))
    assert backward["backward 1"] == (GB // 2, GB)  # written once, for the last micro-step to add to
    assert backward["backward 2"][0] == GB // 2 + GB + 3 * 3 * GB // 4  # read back, kept, plus the step's reads


def test_read_ahead_moves_the_carried_states_into_the_last_backward_and_keeps_their_gradients() -> None:
    quarter = GB // 4
    for overlap in ("off", "forward"):
        plain = traffic(model_step_time(shape(overlap=overlap), machine_rates()))
        carried = model_step_time(
            shape(overlap=overlap, read_ahead_gradients=GB, read_ahead_states=3 * quarter), machine_rates()
        )
        moved = traffic(carried)
        assert moved["backward 1"] == (plain["backward 1"][0] + 3 * quarter, 0)  # states read; no gradient written
        step = {name: value for name, value in moved.items() if not name.startswith("backward")}
        before = {name: value for name, value in plain.items() if not name.startswith("backward")}
        assert sum(r for r, _ in step.values()) == sum(r for r, _ in before.values()) - GB - 3 * quarter
        assert sum(w for _, w in step.values()) == sum(w for _, w in before.values())  # every update written back
    two = traffic(model_step_time(shape(micro_steps=2, read_ahead_gradients=GB, read_ahead_states=0), machine_rates()))
    assert two["backward 1"] == (GB // 2, GB) and two["backward 2"] == (GB // 2 + GB, 0)  # only the last one keeps


def test_states_written_behind_move_from_the_step_into_the_first_backward() -> None:
    half = 3 * GB // 2
    for overlap in ("off", "forward"):
        plain = traffic(model_step_time(shape(overlap=overlap, micro_steps=2), machine_rates()))
        behind = traffic(
            model_step_time(shape(overlap=overlap, micro_steps=2, written_behind_states=half), machine_rates())
        )
        assert behind["backward 1"] == (plain["backward 1"][0], plain["backward 1"][1] + half)
        assert behind["backward 2"] == plain["backward 2"]
        step = [name for name in plain if not name.startswith("backward")]
        assert sum(behind[name][1] for name in step) == sum(plain[name][1] for name in step) - half
        assert sum(behind[name][0] for name in step) == sum(plain[name][0] for name in step)


def test_activations_on_the_ssd_are_written_by_forward_and_read_by_backward() -> None:
    step = traffic(model_step_time(shape(activations=2 * GB), machine_rates()))
    assert step["forward 1"] == (GB, 2 * GB) and step["backward 1"] == (GB // 2 + 2 * GB, GB)


def test_on_the_cpu_accelerator_compute_and_optimizer_share_the_cores() -> None:
    fast_disk = machine_rates(read=100, write=100, mixed=100)
    gpu = model_step_time(shape(overlap="backward", gradients=0), fast_disk)
    host = model_step_time(shape(overlap="backward", gradients=0, accelerator_is_host=True), fast_disk)
    backward_gpu, backward_host = gpu.phases[1], host.phases[1]
    assert backward_gpu.seconds == pytest.approx(2.0)  # compute 2 s, optimizer 0.375 s beside it
    assert backward_host.seconds == pytest.approx(2.0 + 0.375)
    assert gpu.bottleneck == "compute" and host.bottleneck == "compute"


def test_the_engines_cpu_per_byte_moved_takes_the_cores_from_compute_on_the_cpu_accelerator_only() -> None:
    fast_disk, costly_engine = machine_rates(100, 100, 100), machine_rates(100, 100, 100, cpu_read=0.1, cpu_written=0.2)
    host_shape = shape(overlap="backward", gradients=0, accelerator_is_host=True)
    free, host = model_step_time(host_shape, fast_disk), model_step_time(host_shape, costly_engine)
    backward = host.phases[1]
    assert (backward.read_bytes, backward.written_bytes) == (11 * GB // 4, 3 * GB)
    assert backward.seconds == pytest.approx(2.0 + 0.375 + 2.75 * 0.1 + 3 * 0.2)
    assert host.seconds - free.seconds == pytest.approx((host.read_bytes * 0.1 + host.written_bytes * 0.2) / GB)
    gpu = model_step_time(shape(overlap="backward", gradients=0), costly_engine)
    assert gpu.phases[1].seconds == pytest.approx(2.0) and gpu.phases[1].bound_by == "compute"  # CPU: 1.25 s
    starved = model_step_time(shape(overlap="backward", gradients=0), machine_rates(100, 100, 100, cpu_written=1.0))
    assert starved.phases[1].bound_by == "CPU"  # on a GPU the engine competes with Adam, not with compute
    assert starved.phases[1].seconds == pytest.approx(0.375 + 3.0)


def test_a_phase_waits_for_its_reads_while_its_writes_go_out_behind_it_in_the_ssd_time_later_reads_leave() -> None:
    slow_compute = machine_rates(read=1, write=1, mixed=1, per_layer=0.5)  # forward 5 s, backward 10 s
    step = model_step_time(shape(), slow_compute)
    forward, backward, optimizer = step.phases
    assert optimizer.seconds == pytest.approx(4.0)  # its 4 GB of reads; its 4 GB of writes go out in the next forward
    assert (forward.seconds, backward.seconds) == (pytest.approx(5.0), pytest.approx(10.0))
    assert step.seconds == pytest.approx(19.0)  # not 23: no phase waits for its writes while the SSD has time


def test_a_disk_that_reads_and_writes_at_once_takes_writes_beside_the_reads() -> None:
    duplex = model_step_time(shape(), machine_rates(read=1, write=1, mixed=2))  # half of one after the other saved
    assert [phase.seconds for phase in duplex.phases] == [pytest.approx(1.0), pytest.approx(2.0), pytest.approx(4.0)]
    assert duplex.seconds == pytest.approx(7.0) and duplex.bound_seconds == pytest.approx(5.5)
    one_at_a_time = model_step_time(shape(), machine_rates(read=1, write=1, mixed=1))
    assert one_at_a_time.phases[2].seconds == pytest.approx(4.0) and one_at_a_time.seconds == pytest.approx(10.5)


def test_a_write_heavy_phase_costs_what_each_direction_takes_less_the_share_the_mixed_probe_saved() -> None:
    one_at_a_time = SsdRates(1 * GB, 3 * GB, 1.5 * GB, 0.0, 0.0)  # 1 GB each way: 1 s + 1/3 s, as the probe took
    assert ssd_seconds(GB, 6 * GB, one_at_a_time) == pytest.approx(1.0 + 2.0)  # not 7 GB at 1.5 GB/s
    duplex = SsdRates(1 * GB, 3 * GB, 2 * GB, 0.0, 0.0)  # the probe's 2 GB took 1 s: the writes hid under the reads
    assert ssd_seconds(GB, 6 * GB, duplex) == pytest.approx(3.0 * 0.75)  # saves a quarter of the sum, as there
    assert ssd_seconds(GB, GB // 3, duplex) == pytest.approx(1.0)  # never less than one direction alone


def test_overlap_never_makes_the_modelled_step_slower() -> None:
    rates = machine_rates(read=1.2, write=1.8, mixed=1.4)
    off = model_step_time(shape(), rates).seconds
    assert model_step_time(shape(overlap="backward", gradients=0), rates).seconds < off
    assert model_step_time(shape(overlap="forward"), rates).seconds < off


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FUYOU_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rates.json"


def test_the_ssd_is_timed_only_after_the_probe_has_moved_enough_to_spend_a_burst_allowance(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe_bytes = 8 << 20
    monkeypatch.setattr(rates_module, "SSD_PROBE_BYTES", probe_bytes)
    monkeypatch.setattr(rates_module, "SSD_SETTLE_ROUNDS", 3)
    engines: list[IOEngine] = []

    class RecordedEngine(IOEngine):
        def __init__(self, options: IOOptions) -> None:
            super().__init__(options)
            engines.append(self)

    moved_when_timing_starts = []
    timed = rates_module._median_seconds

    def median_seconds(action: Any) -> tuple[float, float]:
        moved_when_timing_starts.append(engines[0].bytes_read + engines[0].bytes_written)
        return timed(action)

    monkeypatch.setattr(rates_module, "IOEngine", RecordedEngine)
    monkeypatch.setattr(rates_module, "_median_seconds", median_seconds)
    ssd_rates([str(tmp_path)], IOOptions())
    assert min(moved_when_timing_starts) >= 2 * probe_bytes + 3 * 2 * probe_bytes  # the files' first writes, 3 rounds


def test_the_ssd_is_measured_once_per_file_system_and_io_options(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rates_module, "SSD_PROBE_BYTES", 8 << 20)
    options = IOOptions(threads=2)
    measured = ssd_rates([str(tmp_path)], options)
    assert measured.read > 0 and measured.write > 0 and measured.mixed > 0
    assert not list(tmp_path.glob("fuyou-swap-*"))  # the probe's files are gone
    monkeypatch.setattr(rates_module, "_probe_ssd", lambda *_: pytest.fail("measured twice"))
    assert ssd_rates([str(tmp_path)], options) == measured
    assert len(json.loads(cache.read_text())) == 1
    assert measured.cpu_per_byte_read > 0 and measured.cpu_per_byte_written > 0  # the checksums, at least
    probed = {"read": 1.0, "write": 2.0, "mixed": 3.0, "cpu_per_byte_read": 4.0, "cpu_per_byte_written": 5.0}
    monkeypatch.setattr(rates_module, "_probe_ssd", lambda *_: probed)
    assert ssd_rates([str(tmp_path)], IOOptions(threads=3)) == SsdRates(1.0, 2.0, 3.0, 4.0, 5.0)  # other options
    assert ssd_rates([str(tmp_path)], IOOptions(threads=2, verify=False)) == SsdRates(1.0, 2.0, 3.0, 4.0, 5.0)


@pytest.mark.launches
def test_compute_is_measured_under_zero_offload_per_layer_and_then_cached(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        **(json.loads((ROOT / "configs/models/llama-tiny/config.json").read_text()) | {"num_hidden_layers": 8})
    )
    shared_memory = set(shared_memory_buffers())
    zero = {"reduce_bucket_size": 65536, "stage3_max_live_parameters": 131072}
    measured = compute_rates(config, 1, 32, torch.float32, "cpu", zero)
    assert set(shared_memory_buffers()) <= shared_memory  # the probe cleaned up
    assert measured.forward_per_layer > 0 and measured.backward_per_layer > 0 and measured.step_per_layer > 0
    assert measured.seconds("backward", 8) > measured.seconds("backward", 4)
    monkeypatch.setattr(rates_module, "_probe_compute", lambda *_: pytest.fail("measured twice"))
    assert compute_rates(config, 1, 32, torch.float32, "cpu", zero) == measured


def test_compute_probe_averages_two_runs_of_the_model_cut_to_eight_layers_which_serve_every_depth(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig

    base = json.loads((ROOT / "configs/models/llama-tiny/config.json").read_text())
    depths, backward = [], iter([0.1, 0.2, 0.3, 0.3])  # a layer's backward per run

    def child(command: list[str], env: dict[str, str], cwd: str, **_: object) -> subprocess.CompletedProcess[str]:
        depths.append(json.loads(Path(command[-1]).read_text())["model_config"]["num_hidden_layers"])
        answer = {f"{phase}_{part}": 1.0 for phase in ("forward", "backward", "step") for part in ("per_layer", "rest")}
        (Path(cwd) / "answer.json").write_text(json.dumps(answer | {"backward_per_layer": next(backward)}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(rates_module.subprocess, "run", child)
    config = AutoConfig.for_model(**base | {"num_hidden_layers": 32})
    thirty_two = compute_rates(config, 1, 32, torch.float32, "cpu", {})
    assert depths == [8, 8]
    assert thirty_two.backward_per_layer == pytest.approx(0.15) and thirty_two.forward_rest == 1.0
    eight = compute_rates(AutoConfig.for_model(**base | {"num_hidden_layers": 8}), 1, 32, torch.float32, "cpu", {})
    assert eight == thirty_two and len(depths) == 2  # the same cut model: measured once for both depths
    compute_rates(AutoConfig.for_model(**base | {"num_hidden_layers": 4}), 1, 32, torch.float32, "cpu", {})
    assert depths[2:] == [4, 4]  # a shallower model is probed whole


def test_a_probed_step_splits_each_phase_into_its_layers_part_and_the_rest() -> None:
    seconds = {"forward": 1.0, "backward": 2.0, "step": 0.5}
    rates = split_step(seconds, forward_layers_s=0.8, backward_layers_s=1.6, layers=8, layer_param_share=0.9)
    assert rates == pytest.approx(
        {
            "forward_per_layer": 0.1,
            "forward_rest": 0.2,
            "backward_per_layer": 0.2,
            "backward_rest": 0.4,
            "step_per_layer": 0.5 * 0.9 / 8,
            "step_rest": 0.05,
        }
    )
    noisy = split_step(seconds, forward_layers_s=1.2, backward_layers_s=1.6, layers=8, layer_param_share=0.9)
    assert noisy["forward_per_layer"] == pytest.approx(0.15) and noisy["forward_rest"] == 0.0


def test_compute_probe_trains_with_the_knobs_fuyou_sets_as_one_launched_rank(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads((ROOT / "configs/models/llama-tiny/config.json").read_text()))
    requests = []

    def child(command: list[str], env: dict[str, str], cwd: str, **_: object) -> subprocess.CompletedProcess[str]:
        requests.append((json.loads(Path(command[-1]).read_text()), env))
        answer = {f"{phase}_{part}": 1.0 for phase in ("forward", "backward", "step") for part in ("per_layer", "rest")}
        (Path(cwd) / "answer.json").write_text(json.dumps(answer))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(rates_module.subprocess, "run", child)
    compute_rates(config, 1, 32, torch.float32, "cpu", {"reduce_bucket_size": 1000})
    assert requests and all(request["zero"] == {"reduce_bucket_size": 1000} for request, _ in requests)
    assert all(env["LOCAL_SIZE"] == "1" for _, env in requests)  # no `numactl` per gradient bucket
    compute_rates(config, 1, 32, torch.float32, "cpu", {"reduce_bucket_size": 2000})  # other knobs: measured again
    assert requests[-1][0]["zero"] == {"reduce_bucket_size": 2000}


def test_estimate_with_time_prints_the_placement_and_the_modelled_step(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((ROOT / "configs/fuyou_cpu.json").read_text())
    config["fuyou"]["nvme_paths"] = [str(tmp_path)]
    config["fuyou"]["placement"] = {"host_memory": "4MiB"}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    monkeypatch.setattr(estimate_module, "ssd_rates", lambda *_: SsdRates(GB, GB, GB, 0.0, 0.0))
    rates = machine_rates(per_layer=0.01).compute
    monkeypatch.setattr(estimate_module, "compute_rates", lambda *_: rates)
    command = ["estimate", "--model", str(ROOT / "configs/models/llama-tiny"), "--config", str(tmp_path / "ds.json")]
    assert fuyou([*command, "--seq-len", "64", "--json"]) == 0
    untimed = json.loads(capsys.readouterr().out)
    assert untimed["step_time"] is None
    assert 0 < untimed["placement"]["parameters"]["dram"] <= 4 << 20  # the first partitions, up to the budget
    assert untimed["placement"]["optimizer_states"]["dram"] == 0
    assert fuyou([*command, "--seq-len", "64", "--json", "--time"]) == 0
    step = json.loads(capsys.readouterr().out)["step_time"]
    assert step["seconds"] >= step["bound_seconds"] > 0 and step["bottleneck"] in ("SSD", "compute")
    assert [phase["name"] for phase in step["phases"]] == ["forward 1", "backward 1"]  # clipping: "forward"
    assert step["phases"][0]["waits_s"] >= 0
    assert fuyou([*command, "--seq-len", "64", "--time"]) == 0
    text = capsys.readouterr().out
    assert "fuyou places" in text and "modelled step (fuyou)" in text and "waits s" in text


def test_the_modelled_step_is_measured_with_the_stage3_knobs_the_run_will_use_explicit_ones_included() -> None:
    config = json.loads((ROOT / "configs/fuyou_cpu.json").read_text())
    config["zero_optimization"] |= {"stage3_prefetch_bucket_size": 100_000, "stage3_max_reuse_distance": 7}
    given = []

    def rates(fake: Any, setup: Any, zero: dict[str, int]) -> MachineRates:
        given.append(zero)
        return machine_rates()

    model = ROOT / "configs/models/llama-tiny"
    assert estimate(model, config, seq_len=64, machine=Machine(None, 64 << 30), rates=rates).step_time
    [zero] = given
    assert zero["stage3_prefetch_bucket_size"] == 100_000 and zero["stage3_max_reuse_distance"] == 7  # the config's
    plain = json.loads((ROOT / "configs/fuyou_cpu.json").read_text())
    default = estimate(model, plain, seq_len=64, machine=Machine(None, 64 << 30), rates=rates)
    assert default.step_time and given[-1]["reduce_bucket_size"] == zero["reduce_bucket_size"] < 500_000_000  # fuyou's


def test_the_next_pass_over_the_layers_reads_only_the_partitions_the_window_did_not_keep(tmp_path: Path) -> None:
    """Released partitions stay in the window's pool up to its peak (`sizing.window_peak`): the backward after a
    forward, and the forward of a micro-step after the first, read only the others."""
    config = json.loads((ROOT / "configs/fuyou_cpu.json").read_text())
    config["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp_path)
    config["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(tmp_path)
    config["fuyou"]["nvme_paths"] = [str(tmp_path)]
    config["gradient_accumulation_steps"] = 2  # with clipping: "forward"
    model = ROOT / "configs/models/llama-tiny"
    result = estimate(model, config, seq_len=64, machine=Machine(None, 64 << 30), rates=lambda *_: machine_rates())
    swapped = result.fuyou.swapped
    assert 0 < swapped["kept_parameters"] <= swapped["parameters"]
    assert result.to_json()["plans"]["fuyou"]["kept_parameter_bytes"] == swapped["kept_parameters"]
    reads = traffic(result.step_time)
    not_kept = swapped["parameters"] - swapped["kept_parameters"] - swapped.get("persistent_parameters", 0)
    assert reads["forward 1"][0] == 0  # the step's updates, handed over
    assert reads["forward 2"][0] == max(0, not_kept)
    config["fuyou"]["pinned_memory"] = "16MiB"  # a window too small to keep the model
    small = estimate(model, config, seq_len=64, machine=Machine(None, 64 << 30), rates=lambda *_: machine_rates())
    assert 0 < small.fuyou.swapped["kept_parameters"] < swapped["kept_parameters"]


def test_auto_with_rates_picks_the_placement_and_overlap_of_the_shortest_modelled_step(tmp_path: Path) -> None:
    config = json.loads((ROOT / "configs/fuyou_cpu.json").read_text())
    config["gradient_clipping"] = 0.0
    config["zero_optimization"]["sub_group_size"] = 10**6  # a few sub-groups: with one, nothing can be overlapped
    config["fuyou"]["nvme_paths"] = [str(tmp_path)]
    config["fuyou"]["placement"] = {"host_memory": 0}
    config["fuyou"]["optimizer"] = {"overlap": "off"}
    machine = Machine(gpu_memory=80 << 30, host_memory=64 << 30)  # a GPU: its compute overlaps CPU Adam
    model = ROOT / "configs/models/llama-tiny"
    untimed = auto_configure(model, config, seq_len=64, machine=machine)
    assert untimed.estimate.step_time is None
    assert untimed.ds_config["fuyou"]["placement"] == {"host_memory": 0}  # nothing to compare without rates
    slow_disk = machine_rates(read=0.01, write=0.01, mixed=0.01)  # so that every SSD byte saved shows
    timed = auto_configure(model, config, seq_len=64, machine=machine, rates=lambda *_: slow_disk)
    assert timed.ds_config["fuyou"]["placement"] == {"host_memory": "auto"}  # the whole model fits in DRAM
    assert timed.ds_config["fuyou"]["optimizer"] == {"overlap": "auto"}  # "backward": no clipping here
    assert "fuyou.placement.host_memory: 0 -> auto" in timed.changes
    assert "fuyou.optimizer.overlap: off -> auto" in timed.changes
    assert timed.estimate.step_time.read_bytes == 0  # nothing left on the SSD to read
    given = estimate(model, config, seq_len=64, machine=machine, rates=lambda *_: slow_disk).step_time
    assert timed.estimate.step_time.seconds < given.seconds


def test_auto_with_rates_proposes_read_ahead_when_the_dram_tier_cannot_hold_the_optimizer(
    tmp_path: Path,
) -> None:
    config = json.loads((ROOT / "configs/fuyou_cpu.json").read_text())
    config["gradient_clipping"] = 1.0  # "forward": gradients go through the SSD, where read-ahead keeps them
    config["zero_optimization"]["sub_group_size"] = 10**6
    config["fuyou"]["nvme_paths"] = [str(tmp_path)]
    config["fuyou"]["placement"] = {"host_memory": "auto"}
    config["fuyou"]["optimizer"] = {"read_ahead": 0}
    machine = Machine(gpu_memory=80 << 30, host_memory=600 << 20)  # "auto" leaves the DRAM tier nothing here
    model = ROOT / "configs/models/llama-tiny"
    slow_disk = machine_rates(read=0.01, write=0.01, mixed=0.01)
    given = estimate(model, config, seq_len=64, machine=machine, rates=lambda *_: slow_disk)
    assert given.fuyou.swapped["optimizer_states"] > 0 and given.fuyou.swapped["read_ahead_gradients"] == 0
    timed = auto_configure(model, config, seq_len=64, machine=machine, rates=lambda *_: slow_disk)
    read_ahead = timed.ds_config["fuyou"]["optimizer"]["read_ahead"]
    # The tiny model's gradients fit in what the window leaves of the budget ("auto"): a pool on top saves no more.
    assert read_ahead == "auto" and timed.ds_config["fuyou"]["pinned_memory"] == 2 << 30
    assert "fuyou.optimizer.read_ahead: 0 -> auto" in timed.changes
    carried = timed.estimate.fuyou.swapped
    assert carried["read_ahead_gradients"] > 0  # SSD bytes saved; states read earlier save none on a disk this slow
    assert timed.estimate.fits and timed.estimate.step_time.seconds < given.step_time.seconds


def test_bench_step_runs_its_fuyou_side_at_the_host_memory_it_is_given_else_at_the_default(tmp_path: Path) -> None:
    from bench_step import side_config  # scripts/, on pytest's pythonpath

    base = json.loads((ROOT / "configs/fuyou_cpu.json").read_text())
    base["fuyou"]["placement"] = {"host_memory": 0}
    default = side_config(base, "fuyou", tmp_path, 1024, 0)
    assert "placement" not in default["fuyou"]
    assert side_config(base, "fuyou", tmp_path, 1024, 0, 8 << 30)["fuyou"]["placement"] == {"host_memory": 8 << 30}
    assert side_config(base, "fuyou-ssd", tmp_path, 1024, 0, 8 << 30)["fuyou"]["placement"] == {"host_memory": 0}
