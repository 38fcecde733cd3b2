"""The estimator against the real thing: activations of a real CPU forward, and what DeepSpeed really allocates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from deepspeed_fuyou.cli.main import main as fuyou
from deepspeed_fuyou.config.fuyou import FuyouConfig
from deepspeed_fuyou.estimator.activations import saved_tensors
from deepspeed_fuyou.estimator.auto import auto_configure
from deepspeed_fuyou.estimator.estimate import GLIBC_HEAP_SLACK, RUNTIME_OVERHEAD_HOST, Machine, estimate
from deepspeed_fuyou.estimator.memory import striped_member_bytes
from deepspeed_fuyou.estimator.model import build_fake_model, load_model_config
from deepspeed_fuyou.io.engine import checksum_table_bytes
from deepspeed_fuyou.plan.preflight import space_problems
from deepspeed_fuyou.plan.zero_layout import ZeroLayout, sub_groups
from tests.conftest import run_deepspeed
from tests.estimator_models import FAMILIES, transformers_config

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "programs" / "zero_state_probe.py"
MiB = 1 << 20
TINY_LLAMA = ROOT / "configs" / "models" / "llama-tiny"
ACTIVATION_TOLERANCE = 0.03


def stock_config(micro_batch: int = 2, **zero: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu"},
            "offload_optimizer": {"device": "cpu"},
            **zero,
        },
    }


def fuyou_config(swap: Path, micro_batch: int = 2, **estimator: Any) -> dict[str, Any]:
    config = stock_config(micro_batch)
    config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(swap)}
    config["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": str(swap)}
    config["fuyou"] = {"pinned_memory": "64MiB", "estimator": estimator}
    return config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("micro_batch,seq_len", [(1, 16), (2, 48), (3, 100)])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fake_forward_saves_the_activation_bytes_of_a_real_cpu_forward(
    family: str, micro_batch: int, seq_len: int, dtype: torch.dtype
) -> None:
    config = transformers_config(family)
    estimated = build_fake_model(config, dtype).saved_tensors(micro_batch, seq_len)
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
    measured = saved_tensors(real, torch.randint(0, config.vocab_size, (micro_batch, seq_len)))
    assert measured.nbytes > 0
    assert abs(estimated.nbytes - measured.nbytes) <= ACTIVATION_TOLERANCE * measured.nbytes
    assert estimated.largest == measured.largest


def test_views_and_parameters_are_not_counted_as_activations() -> None:
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    class Twice(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
            h = linear(x)  # saves x and the weight (a parameter)
            y = h * h  # saves h twice: one storage
            return type("Out", (), {"loss": y.sum()})()

    twice = Twice()
    twice.register_module("linear", linear)
    saved = saved_tensors(twice, torch.zeros(1))
    assert saved.nbytes == x.nbytes + 4 * 8 * 4
    assert saved.storages == 2


def test_sub_groups_close_at_the_parameter_that_reaches_the_size_like_deepspeed() -> None:
    assert sub_groups([5, 5, 5, 5], 100) == [range(0, 4)]
    assert sub_groups([5, 5, 5, 5], 10) == [range(0, 2), range(2, 4)]
    assert sub_groups([5, 5, 5, 5, 1], 9) == [range(0, 2), range(2, 4), range(4, 5)]
    layout = ZeroLayout.build([7, 3, 10], world_size=2, sub_group_size=4)
    assert layout.partitions == (4, 2, 5)
    assert layout.sub_group_numels == [4, 7]


def test_a_striped_file_is_spread_over_every_path_in_whole_blocks() -> None:
    members = striped_member_bytes(5 * 4096 + 100, 4096, 2)
    assert members == [3 * 4096, 3 * 4096]  # stripes 0, 2, 4 | 1, 3 and the 100-byte tail, rounded to a block
    assert sum(striped_member_bytes(10 << 20, 1 << 20, 3)) == 10 << 20


@pytest.fixture(scope="module")
def deepspeed_allocations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family trained one step by real DeepSpeed on two ranks (gloo), with small sub-groups."""
    out = tmp_path_factory.mktemp("probe")
    (out / "models.json").write_text(json.dumps(FAMILIES))
    (out / "ds.json").write_text(json.dumps(stock_config(sub_group_size=9000)))
    result = run_deepspeed(PROBE, "--models", "models.json", "--config", "ds.json", "--out", str(out), cwd=out, ranks=2)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


@pytest.mark.launches
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_state_bytes_equal_what_deepspeed_allocates_on_each_of_two_ranks(
    family: str, deepspeed_allocations: Path
) -> None:
    result = estimate(transformers_config(family), stock_config(sub_group_size=9000), seq_len=16, world_size=2)
    numels = [p.numel for p in build_fake_model(transformers_config(family)).params]
    layout = ZeroLayout.build(numels, world_size=2, sub_group_size=9000)
    for rank in (0, 1):
        real = json.loads((deepspeed_allocations / f"{family}-rank{rank}.json").read_text())
        assert real["partitions"] == list(layout.partitions)
        assert real["sub_groups"] == real["master"] == layout.sub_group_numels
        assert real["gradient_buffer"] == layout.partition_total
        assert real["optimizer_states"] == 2 * layout.partition_total
    stock = result.stock
    padded = layout.partition_total
    assert padded >= -(-sum(numels) // 2)
    assert stock.pinned_host.parameters == 4 * padded  # offload_param cpu, pinned
    assert stock.pinned_host.gradients == 4 * padded  # grad_partitions_flat_buffer, pinned
    assert stock.pageable_host.optimizer_states == 4 * padded + 2 * 4 * padded  # master + Adam's two moments


def test_the_suggested_micro_batch_fits_when_estimated_again(tmp_path: Path) -> None:
    config = fuyou_config(tmp_path, micro_batch=8)
    roomy = estimate(TINY_LLAMA, config, seq_len=256, machine=Machine(gpu_memory=1 << 40, host_memory=1 << 40))
    activations = roomy.chosen.gpu.activations + roomy.chosen.gpu.temporaries
    gpu = roomy.chosen.gpu.total - activations // 2  # room for about half the micro-batch
    tight = Machine(gpu_memory=int(gpu / 0.95), host_memory=1 << 40)
    result = estimate(TINY_LLAMA, config, seq_len=256, machine=tight)
    assert not result.fits
    assert result.problems[0].startswith("GPU memory")
    suggested = int(result.suggestions[0].split(" to ")[1].split(" ")[0])
    assert 1 <= suggested < 8
    assert estimate(TINY_LLAMA, config, seq_len=256, micro_batch=suggested, machine=tight).fits
    assert not estimate(TINY_LLAMA, config, seq_len=256, micro_batch=suggested + 1, machine=tight).fits


def test_a_host_smaller_than_the_pinned_budget_is_reported_with_the_fix(tmp_path: Path) -> None:
    result = estimate(
        TINY_LLAMA,
        fuyou_config(tmp_path, validate=False),
        seq_len=64,
        machine=Machine(gpu_memory=None, host_memory=256 << 20),
    )
    assert not result.fits
    assert result.problems[0].startswith("host memory")


def test_glibc_heap_slack_is_counted_only_where_glibc_serves_the_large_tensors(tmp_path: Path) -> None:
    """Stock DeepSpeed and fuyou with `host_cache: false` leave large tensors to glibc, whose heap keeps freed blocks;
    with fuyou's host cache (the default) RSS follows the tensors in use, so the estimate drops that slack."""
    machine = Machine(gpu_memory=None, host_memory=64 << 30)
    cached = estimate(TINY_LLAMA, fuyou_config(tmp_path, validate=False), seq_len=64, machine=machine)
    config = fuyou_config(tmp_path, validate=False)
    config["fuyou"]["host_cache"] = False
    uncached = estimate(TINY_LLAMA, config, seq_len=64, machine=machine)
    assert cached.fuyou is not None and uncached.fuyou is not None
    assert cached.fuyou.pageable_host.overhead == RUNTIME_OVERHEAD_HOST
    assert uncached.fuyou.pageable_host.overhead == RUNTIME_OVERHEAD_HOST + GLIBC_HEAP_SLACK
    assert (
        cached.stock.pageable_host.overhead
        == uncached.stock.pageable_host.overhead
        == uncached.fuyou.pageable_host.overhead
    )
    # nothing else in the plan depends on who serves the large tensors
    assert uncached.fuyou.pageable_host.total - cached.fuyou.pageable_host.total == GLIBC_HEAP_SLACK


def test_cli_json_has_every_documented_key_and_gpu_activations_are_the_traced_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "ds.json"
    config_path.write_text(json.dumps(fuyou_config(tmp_path)))
    code = fuyou(["estimate", "--model", str(TINY_LLAMA), "--config", str(config_path), "--seq-len", "64", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fits"] is True and report["plan"] == "fuyou"
    for key in ("gpu_peak_bytes", "pinned_host_peak_bytes", "pageable_host_peak_bytes", "ssd_bytes", "suggestions"):
        assert key in report
    components = {"parameters", "gradients", "optimizer_states", "activations", "buffers", "temporaries", "overhead"}
    assert set(report["breakdown"]) == {"gpu", "pinned_host", "pageable_host", "ssd"}
    assert all(set(device) == components for device in report["breakdown"].values())
    assert set(report["plans"]) == {"stock", "fuyou"}
    fake = build_fake_model(load_model_config(TINY_LLAMA))
    assert report["breakdown"]["gpu"]["activations"] == fake.saved_tensors(2, 64).nbytes
    assert report["gpu_peak_bytes"] == sum(report["breakdown"]["gpu"].values())


def test_validate_with_a_model_fails_with_exit_2_when_it_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = fuyou_config(tmp_path, gpu_memory="1MiB")
    config_path = tmp_path / "ds.json"
    config_path.write_text(json.dumps(config))
    base = ["validate", str(config_path), "--model", str(TINY_LLAMA), "--seq-len", "64"]
    assert fuyou(base) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "GPU memory" in err
    config["fuyou"]["estimator"] = {}
    config_path.write_text(json.dumps(config))
    assert fuyou(base) == 0
    assert fuyou(["estimate", "--model", str(TINY_LLAMA), "--config", str(config_path), "--seq-len", "64"]) == 0


@pytest.mark.launches
def test_training_refuses_to_start_when_the_ssd_cannot_hold_the_optimizer_swap(tmp_path: Path, mounted: Any) -> None:
    """The parameters (13 MB) fit on a 24 MiB file system, master weights, Adam moments and gradients do not."""
    small = mounted("tmpfs", "size=24m")
    config = fuyou_config(small)
    config_path = tmp_path / "ds.json"
    config_path.write_text(json.dumps(config))
    args = ["--deepspeed_config", str(config_path), "--steps", "1", "--output-dir", str(tmp_path / "out")]
    result = run_deepspeed(ROOT / "scripts" / "finetune.py", *args, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "FuyouConfigError" in output and "fuyou.nvme_paths[0]" in output and "of swap space" in output
    assert not list(small.rglob("optim-*")), "no optimizer swap file may be written before the check"


def test_the_ssd_check_counts_a_checkpoint_export_on_the_first_path_only(tmp_path: Path, mounted: Any) -> None:
    """Swap that fits a file system is refused there once the checkpoint export must fit beside it, and only on the
    file system of the first path, where `export_checkpoint` writes."""
    small = mounted("tmpfs", "size=8m")
    alone = FuyouConfig(nvme_paths=[small])
    assert space_problems(alone, 6 * MiB) == []
    (problem,) = space_problems(alone, 6 * MiB, export_bytes=4 * MiB)
    assert problem.field == "fuyou.nvme_paths[0]" and "checkpoint's export" in str(problem)
    big = tmp_path / "big"
    big.mkdir()
    assert space_problems(FuyouConfig(nvme_paths=[big, small]), 12 * MiB, export_bytes=4 * MiB) == []
    (problem,) = space_problems(FuyouConfig(nvme_paths=[small, big]), 12 * MiB, export_bytes=4 * MiB)
    assert problem.field == "fuyou.nvme_paths[0]"


def test_the_estimate_reports_the_checkpoint_export_as_every_sub_groups_master_and_states(tmp_path: Path) -> None:
    config = fuyou_config(tmp_path)
    config["fuyou"]["placement"] = {"host_memory": 0}  # everything on the SSD: the export is what the SSD holds
    result = estimate(TINY_LLAMA, config, seq_len=64)
    assert result.fuyou.checkpoint_export == result.fuyou.swapped["optimizer_states"] > 0
    assert result.to_json()["plans"]["fuyou"]["checkpoint_export_bytes"] == result.fuyou.checkpoint_export
    config["fuyou"]["placement"] = {"host_memory": "1GiB"}  # the DRAM tier holds it all: exported all the same
    assert estimate(TINY_LLAMA, config, seq_len=64).fuyou.checkpoint_export == result.fuyou.checkpoint_export


def test_the_estimate_counts_read_ahead_gradients_first_and_its_pool_in_pinned_memory(tmp_path: Path) -> None:
    config = fuyou_config(tmp_path)
    config["gradient_clipping"] = 1.0  # "forward": gradients go to the SSD, so there is something to carry
    config["fuyou"]["placement"] = {"host_memory": 0}
    auto = estimate(TINY_LLAMA, config, seq_len=64).fuyou  # "auto": the 32 MiB window share less what it needs
    config["fuyou"]["optimizer"] = {"read_ahead": 0}
    without = estimate(TINY_LLAMA, config, seq_len=64).fuyou
    config["fuyou"]["optimizer"] = {"read_ahead": "20MiB"}
    carried = estimate(TINY_LLAMA, config, seq_len=64)
    swapped = carried.fuyou.swapped
    assert swapped["read_ahead_gradients"] == swapped["gradients"]  # 12.6 MiB of gradients fit first
    assert 0 < swapped["read_ahead_states"] < swapped["optimizer_states"]  # then states, with what is left
    assert 0 < swapped["written_behind_states"] < swapped["optimizer_states"]  # and, before them, the last ones'
    assert swapped["read_ahead_gradients"] + swapped["read_ahead_states"] <= carried.fuyou.read_ahead_pool <= 20 * MiB
    assert carried.to_json()["plans"]["fuyou"]["read_ahead_bytes"] == {
        "gradients": swapped["read_ahead_gradients"],
        "optimizer_states": swapped["read_ahead_states"],
        "written_behind": swapped["written_behind_states"],
        "step_pool_early": swapped["early_read_states"],
        "pinned_pool": carried.fuyou.read_ahead_pool,
    }
    assert swapped["early_read_states"] > 0 and without.swapped["early_read_states"] > 0  # the step pool's own
    carried_keys = ("read_ahead_gradients", "read_ahead_states", "written_behind_states")
    assert not any(without.swapped[key] for key in carried_keys)
    assert 0 < auto.swapped["read_ahead_gradients"] < swapped["gradients"] and 0 < auto.read_ahead_pool < 32 * MiB
    assert auto.pinned_host.buffers <= 64 * MiB
    config["gradient_clipping"] = 0.0  # "backward": nothing to carry, the budget goes to the step pool
    stepped_in_backward = estimate(TINY_LLAMA, config, seq_len=64).fuyou.swapped
    assert not stepped_in_backward["read_ahead_gradients"] and not stepped_in_backward["early_read_states"]


def test_auto_keeps_the_global_batch_and_picks_the_largest_micro_batch_that_fits(tmp_path: Path) -> None:
    config = fuyou_config(tmp_path, micro_batch=8)
    roomy = estimate(TINY_LLAMA, config, seq_len=256, machine=Machine(gpu_memory=1 << 40, host_memory=1 << 40))
    activations = roomy.chosen.gpu.activations + roomy.chosen.gpu.temporaries
    tight = Machine(gpu_memory=int((roomy.chosen.gpu.total - activations * 0.6) / 0.95), host_memory=1 << 40)
    proposal = auto_configure(TINY_LLAMA, config, seq_len=256, machine=tight)
    chosen = proposal.ds_config
    assert proposal.estimate.fits
    assert chosen["train_micro_batch_size_per_gpu"] * chosen["gradient_accumulation_steps"] == 8
    assert chosen["train_micro_batch_size_per_gpu"] in (2, 4)
    larger = {**chosen, "train_micro_batch_size_per_gpu": 2 * chosen["train_micro_batch_size_per_gpu"]}
    assert not estimate(TINY_LLAMA, larger, seq_len=256, machine=tight).fits
    assert "train_micro_batch_size_per_gpu: 8 -> " in proposal.changes[0]


def test_auto_writes_a_config_that_validates_with_the_model(tmp_path: Path) -> None:
    source, written = tmp_path / "ds.json", tmp_path / "auto.json"
    source.write_text(json.dumps(fuyou_config(tmp_path, micro_batch=4)))
    model = ["--model", str(TINY_LLAMA), "--seq-len", "64"]
    assert fuyou(["estimate", "--auto", "--config", str(source), *model, "--write", str(written)]) == 0
    assert json.loads(written.read_text())["fuyou"]["params"]["prefetch_layers"] == 2
    assert fuyou(["validate", str(written), *model]) == 0
    assert fuyou(["estimate", "--config", str(source), *model, "--write", str(written)]) == 2  # --write needs --auto


def test_machine_limits_given_on_the_command_line_replace_the_detected_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "ds.json"
    config_path.write_text(json.dumps(fuyou_config(tmp_path)))
    base = ["estimate", "--model", str(TINY_LLAMA), "--config", str(config_path), "--seq-len", "64", "--json"]
    assert fuyou([*base, "--gpu-memory", "1MiB", "--host-memory", "1TiB"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["gpu_memory"] == 1 << 20 and report["machine"]["host_memory"] == 1 << 40
    assert report["fits"] is False and report["problems"][0].startswith("GPU memory")
    with pytest.raises(SystemExit):
        fuyou([*base, "--gpu-memory", "lots"])


def test_model_states_too_large_for_the_accelerator_suggest_nvme_offload_not_a_smaller_batch() -> None:
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}
    result = estimate(TINY_LLAMA, config, seq_len=64, machine=Machine(gpu_memory=20 << 20, host_memory=1 << 40))
    assert result.stock.gpu.optimizer_states > 20 << 20
    assert not result.fits
    assert "offload parameters and optimizer states to NVMe" in result.suggestions[0]


def test_when_activations_overflow_the_gpu_it_suggests_offloading_them_and_that_config_fits(tmp_path: Path) -> None:
    model = transformers_config("llama", num_hidden_layers=8)
    config = fuyou_config(tmp_path, micro_batch=8)
    config["fuyou"]["activations"] = {"offload": "off", "min_tensor_size": "64KiB"}
    roomy = estimate(model, config, seq_len=256, machine=Machine(gpu_memory=1 << 40, host_memory=1 << 40)).chosen
    tight = Machine(gpu_memory=int((roomy.gpu.total - roomy.gpu.activations * 0.4) / 0.95), host_memory=1 << 40)
    short = estimate(model, config, seq_len=256, machine=tight)
    assert not short.fits
    assert any('"offload": "auto"' in suggestion for suggestion in short.suggestions)
    config["fuyou"]["activations"]["offload"] = "auto"
    offloaded = estimate(model, config, seq_len=256, machine=tight)
    assert offloaded.fits
    assert offloaded.chosen.ssd.activations > 0
    assert offloaded.chosen.gpu.activations < roomy.gpu.activations * 0.6


def test_auto_turns_activation_offload_on_before_it_lowers_the_micro_batch(tmp_path: Path) -> None:
    model = transformers_config("llama", num_hidden_layers=8)
    config = fuyou_config(tmp_path, micro_batch=8)
    config["fuyou"]["activations"] = {"min_tensor_size": "64KiB"}  # "offload" left to the search
    roomy = estimate(model, config, seq_len=256, machine=Machine(gpu_memory=1 << 40, host_memory=1 << 40)).chosen
    tight = Machine(gpu_memory=int((roomy.gpu.total - roomy.gpu.activations * 0.4) / 0.95), host_memory=1 << 40)
    proposal = auto_configure(model, config, seq_len=256, machine=tight)
    assert proposal.estimate.fits
    assert proposal.ds_config["train_micro_batch_size_per_gpu"] == 8
    assert proposal.ds_config["fuyou"]["activations"] == {"min_tensor_size": "64KiB", "offload": "auto"}
    assert "fuyou.activations.offload: (default) -> auto" in proposal.changes
    config["fuyou"]["activations"]["offload"] = "off"  # said explicitly: kept, the micro-batch gives way instead
    kept = auto_configure(model, config, seq_len=256, machine=tight)
    assert kept.ds_config["fuyou"]["activations"]["offload"] == "off"
    assert kept.ds_config["train_micro_batch_size_per_gpu"] < 8


def test_the_dram_tier_moves_files_from_the_ssd_to_host_memory_in_the_order_training_places_them(
    tmp_path: Path,
) -> None:
    """Parameters first, then gradients, then whole sub-groups; what does not fit stays on the SSD."""
    machine = Machine(gpu_memory=None, host_memory=1 << 40)

    def plan(host_memory: int | str, clipping: float = 1.0) -> Any:
        config = fuyou_config(tmp_path, validate=False) | {"gradient_clipping": clipping}
        config["fuyou"]["placement"] = {"host_memory": host_memory}
        return estimate(TINY_LLAMA, config, seq_len=64, machine=machine).chosen

    ssd = plan(0).ssd
    assert plan(0).pageable_host.parameters == 0
    only_parameters = plan(ssd.parameters)
    assert only_parameters.pageable_host.parameters == ssd.parameters and only_parameters.ssd.parameters == 0
    assert only_parameters.ssd.gradients == ssd.gradients
    everything = plan("1GiB")
    assert everything.ssd.total == 0
    moved = everything.pageable_host  # the bytes of the files, which on the SSD round up to whole blocks
    assert (moved.parameters, moved.gradients, moved.optimizer_states) == pytest.approx(
        (ssd.parameters, ssd.gradients, ssd.optimizer_states), rel=1e-3
    )
    # stepped during backward (no clipping), gradients are never written: they take no place
    assert plan("1GiB", clipping=0.0).pageable_host.gradients == 0


def test_fp32_partitions_on_the_ssd_are_counted_as_stored_in_their_masters_and_others_are_not(tmp_path: Path) -> None:
    machine = Machine(gpu_memory=None, host_memory=1 << 40)

    def swapped(host_memory: int, bf16: bool = False) -> dict[str, int]:
        config = fuyou_config(tmp_path, validate=False) | {"bf16": {"enabled": bf16}}
        config["fuyou"]["placement"] = {"host_memory": host_memory}
        return estimate(TINY_LLAMA, config, seq_len=64, machine=machine).chosen.swapped

    on_ssd = swapped(0)
    assert on_ssd["parameters_in_masters"] == on_ssd["parameters"] > 0
    assert swapped(on_ssd["parameters"]).get("parameters_in_masters") == 0  # the DRAM tier holds the partitions
    assert swapped(0, bf16=True).get("parameters_in_masters", 0) == 0  # bf16 partitions are not the fp32 masters


def test_the_checksums_of_the_swap_files_are_counted_in_host_memory_only_when_verified(tmp_path: Path) -> None:
    machine = Machine(gpu_memory=None, host_memory=1 << 40)

    def plan(verify: bool) -> Any:
        config = fuyou_config(tmp_path, validate=False)
        config["fuyou"] |= {"io": {"verify": verify}, "placement": {"host_memory": 0}}
        return estimate(TINY_LLAMA, config, seq_len=64, machine=machine).chosen

    verified, unverified = plan(True), plan(False)
    assert verified.ssd.total == unverified.ssd.total > 0
    extra = verified.pageable_host.buffers - unverified.pageable_host.buffers
    assert extra == checksum_table_bytes(verified.ssd.total) == -(-verified.ssd.total // 4096) * 5


@pytest.mark.parametrize("gpu_memory", ["auto", "1GiB"])
def test_estimator_gpu_memory_auto_is_the_detected_device_and_a_size_replaces_it(
    gpu_memory: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` reads the device's memory (here a pretend 1 MiB GPU, which nothing fits); a size is taken instead."""

    class Device:
        total_memory = 1 * MiB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Device())
    result = estimate(TINY_LLAMA, fuyou_config(tmp_path, validate=False, gpu_memory=gpu_memory), seq_len=64)
    assert result.machine.gpu_memory == (MiB if gpu_memory == "auto" else 1 << 30)
    assert result.fits is (gpu_memory != "auto")


@pytest.mark.parametrize("host_memory", ["auto", "64GiB"])
def test_estimator_host_memory_auto_is_this_machines_memory_and_a_size_replaces_it(
    host_memory: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` reads the host's memory (here a pretend 256 MiB host, smaller than the pinned budget's needs)."""
    monkeypatch.setattr("deepspeed_fuyou.config.fuyou.host_memory_bytes", lambda: 256 * MiB)
    result = estimate(TINY_LLAMA, fuyou_config(tmp_path, validate=False, host_memory=host_memory), seq_len=64)
    assert result.machine.host_memory == (256 * MiB if host_memory == "auto" else 64 << 30)
    assert result.fits is (host_memory != "auto")
    if host_memory == "auto":
        assert result.problems[0].startswith("host memory")
