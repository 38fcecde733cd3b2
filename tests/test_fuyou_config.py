"""The `"fuyou"` block as DeepSpeed hands it to us: defaults, cross-checks, and errors that name the field and fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deepspeed_fuyou.config import reference
from deepspeed_fuyou.config.checks import FuyouConfigWarning
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.plan import preflight
from deepspeed_fuyou.plan.preflight import load_fuyou_config
from deepspeed_fuyou.plan.sizing import pool_budgets, read_ahead_plan, sub_group_cap

ROOT = Path(__file__).resolve().parent.parent


def ds_config(swap: Path, block: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": str(swap / "a")},
            "offload_optimizer": {"device": "nvme", "nvme_path": str(swap / "b")},
        },
    }
    if block is not None:
        config["fuyou"] = block
    return config


@pytest.fixture
def swap(tmp_path: Path) -> Path:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    return tmp_path


def test_without_a_block_there_is_no_fuyou_config(swap: Path) -> None:
    assert load_fuyou_config(ds_config(swap)) is None


def test_empty_block_takes_the_offload_paths_and_working_defaults(swap: Path) -> None:
    config = load_fuyou_config(ds_config(swap, {}))
    assert config.nvme_paths == (swap / "a", swap / "b")
    assert 0 < config.pinned_memory <= 8 << 30
    assert config.params.prefetch_layers == 2
    assert config.optimizer.overlap == "auto"
    assert config.activations.offload == "off"
    assert config.estimator.validate_at_start


def test_sizes_are_read_with_their_units(swap: Path) -> None:
    block = {"pinned_memory": "1.5GiB", "io": {"block_size": "4KiB"}, "activations": {"min_tensor_size": 8 << 20}}
    config = load_fuyou_config(ds_config(swap, block))
    assert (config.pinned_memory, config.io.block_size) == (3 << 29, 4096)
    assert config.activations.min_tensor_size == 8 << 20


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("fuyou_*.json")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    assert load_fuyou_config(json.loads(path.read_text())) is not None


def test_machine_checks_are_skipped_when_validation_is_off(swap: Path) -> None:
    block = {"nvme_paths": [str(swap / "missing")], "estimator": {"validate": False}}
    assert load_fuyou_config(ds_config(swap, block)).nvme_paths == (swap / "missing",)
    with pytest.raises(FuyouConfigError) as caught:  # the block itself is still checked
        load_fuyou_config(ds_config(swap, {**block, "io": {"threads": 0}}))
    assert caught.value.fields == ["fuyou.io.threads"]


def test_swap_that_does_not_fit_the_free_space_names_the_directory(swap: Path) -> None:
    config = ds_config(swap, {"nvme_paths": [str(swap / "a"), str(swap / "b")]})
    assert load_fuyou_config(config, ssd_bytes=1 << 20) is not None
    with pytest.raises(FuyouConfigError) as caught:
        load_fuyou_config(config, ssd_bytes=1 << 60)
    # Both directories are on one file system, which needs the whole swap: reported once, at the first of them.
    assert caught.value.fields == ["fuyou.nvme_paths[0]"]
    assert "free" in caught.value.reason and "add another SSD" in caught.value.fix


def test_fuyou_validate_exits_0_on_a_good_config_and_2_listing_every_problem(swap: Path) -> None:
    good, bad = swap / "good.json", swap / "bad.json"
    good.write_text(json.dumps(ds_config(swap, {})))
    bad.write_text(json.dumps(ds_config(swap, {"io": {"queue_dept": 8}, "params": {"prefetch_layers": -1}})))
    command = [sys.executable, "-m", "deepspeed_fuyou.cli.main", "validate"]
    ok = subprocess.run([*command, str(good)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "valid" in ok.stdout, ok.stderr
    failed = subprocess.run([*command, str(bad)], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert "2 problem(s)" in failed.stderr
    assert "fuyou.io.queue_dept" in failed.stderr and "did you mean 'queue_depth'" in failed.stderr
    assert "fuyou.params.prefetch_layers = -1" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.launches
def test_a_misspelt_key_stops_an_unchanged_script_before_training(tmp_path: Path) -> None:
    config = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
    config["fuyou"]["pinned_memroy"] = config["fuyou"].pop("pinned_memory")
    config_path = tmp_path / "ds_config.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--deepspeed_config", str(config_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "FuyouConfigError: fuyou.pinned_memroy" in result.stderr and "did you mean 'pinned_memory'" in result.stderr
    assert "fine-tune" not in result.stderr  # the progress bar never started
    assert not (tmp_path / "checkpoints").exists()


def test_overlap_auto_steps_during_backward_unless_clipping_or_fp16_needs_the_norm_first(swap: Path) -> None:
    config = load_fuyou_config(ds_config(swap, {}))
    assert config.optimizer.mode(gradient_clipping=0.0, fp16=False) == "backward"
    assert config.optimizer.mode(gradient_clipping=1.0, fp16=False) == "forward"
    assert config.optimizer.mode(gradient_clipping=0.0, fp16=True) == "forward"
    for explicit in ("off", "backward", "forward"):
        block = {"optimizer": {"overlap": explicit}}
        assert load_fuyou_config(ds_config(swap, block)).optimizer.mode(0.0, False) == explicit


@pytest.mark.parametrize("needs_norm", [{"gradient_clipping": 1.0}, {"fp16": {"enabled": True}}])
def test_overlap_backward_is_refused_where_the_global_norm_is_needed_before_the_first_update(
    swap: Path, needs_norm: dict[str, Any]
) -> None:
    config = {**ds_config(swap, {"optimizer": {"overlap": "backward"}}), **needs_norm}
    with pytest.raises(FuyouConfigError) as caught:
        load_fuyou_config(config)
    problem = caught.value.problems[0]
    assert problem.field == "fuyou.optimizer.overlap" and '"forward"' in problem.fix


def test_read_ahead_comes_out_of_the_pinned_budget_and_joins_the_step_pool_when_nothing_is_carried(
    swap: Path,
) -> None:
    """`optimizer.read_ahead` gets its own pool in the modes that carry sub-groups; with "backward" (nothing to carry)
    the step's pool gets it instead, so its sub-groups grow; 0 leaves the budget as it was."""
    config = load_fuyou_config(ds_config(swap, {"pinned_memory": "1GiB", "optimizer": {"read_ahead": "256MiB"}}))
    without = load_fuyou_config(ds_config(swap, {"pinned_memory": "1GiB", "optimizer": {"read_ahead": 0}}))
    mib = 1 << 20
    assert pool_budgets(config, "forward") == pool_budgets(config, "off") == (384 * mib, 384 * mib, 256 * mib)
    assert pool_budgets(config, "backward") == (384 * mib, 640 * mib, 0)
    assert pool_budgets(without, "forward") == pool_budgets(without, "backward") == (512 * mib, 512 * mib, 0)
    caps = {mode: sub_group_cap(config, mode, largest_param=1000) for mode in ("forward", "backward")}
    assert caps["backward"] > sub_group_cap(without, "backward", largest_param=1000) > caps["forward"]


def test_auto_read_ahead_is_what_the_parameter_window_leaves_of_its_share_and_the_step_pool_keeps_its_own(
    swap: Path,
) -> None:
    """`read_ahead: "auto"`, the default: once the model is known, the forward/backward pool keeps what its window
    needs and a quarter more (at least the smallest pool), and the rest of its share carries sub-groups; the step
    pool keeps its share, so the sub-groups are those of `read_ahead: 0`. Nothing is carried before the model is
    known, in "backward", with activation offload (whose staging takes the pool's room), or when the window needs the
    whole share."""
    mib = 1 << 20
    auto = load_fuyou_config(ds_config(swap, {"pinned_memory": "1GiB"}))
    none = load_fuyou_config(ds_config(swap, {"pinned_memory": "1GiB", "optimizer": {"read_ahead": 0}}))
    offloading = load_fuyou_config(ds_config(swap, {"pinned_memory": "1GiB", "activations": {"offload": "all"}}))
    assert auto.optimizer.read_ahead is None
    assert pool_budgets(auto, "forward", 100 * mib) == pool_budgets(auto, "off", 100 * mib)
    assert pool_budgets(auto, "forward", 100 * mib) == (125 * mib, 512 * mib, 387 * mib)
    assert pool_budgets(auto, "forward", 100 * mib + 1) == (126 * mib, 512 * mib, 386 * mib)  # whole MiB
    assert pool_budgets(auto, "forward", 1000) == (16 * mib, 512 * mib, 496 * mib)
    nothing = (512 * mib, 512 * mib, 0)
    assert pool_budgets(none, "forward", 100 * mib) == pool_budgets(auto, "forward") == nothing
    assert pool_budgets(auto, "backward", 100 * mib) == pool_budgets(auto, "forward", 600 * mib) == nothing
    assert pool_budgets(offloading, "forward", 100 * mib) == nothing
    assert sub_group_cap(auto, "forward", largest_param=1000) == sub_group_cap(none, "forward", largest_param=1000)


def test_read_ahead_keeps_gradients_first_then_writes_behind_and_reads_ahead_states_with_what_is_left() -> None:
    """Gradients: the longest prefix in step order that fits; with what is left, the states of the longest suffix are
    written behind and the master and states of the longest prefix read ahead (at different times, so both fit in
    it); a sub-group with nothing to carry (no gradient file, or states in the DRAM tier) takes no room."""
    slot = 4096
    three = [slot // 4] * 3  # fp32 elements: one slot each
    everything = [True] * 3

    def plan(budget_slots: float, gradients: list[bool] = everything, states: list[bool] = everything) -> tuple:
        found = read_ahead_plan(three, 4, 2, gradients, states, int(budget_slots * slot))
        return found.kept_gradients, found.read_states, found.written_behind, found.pool_bytes // slot

    assert plan(0) == ([], [], [], 0)
    assert plan(2.5) == ([0, 1], [], [], 2)
    assert plan(3) == ([0, 1, 2], [], [], 3)
    assert plan(5) == ([0, 1, 2], [], [2], 5)  # two slots left: one sub-group's two moments written behind
    assert plan(6) == ([0, 1, 2], [0], [2], 6)
    assert plan(7) == ([0, 1, 2], [0], [1, 2], 7)
    assert plan(1000) == ([0, 1, 2], [0, 1, 2], [0, 1, 2], 12)
    assert plan(3, gradients=[False] * 3, states=[False, True, True]) == ([], [1], [2], 3)
    assert read_ahead_plan([slot // 4, 1, 1], 4, 2, everything, everything, 3 * slot).slot == slot  # the largest
    assert read_ahead_plan(three, 4, 0, everything, everything, 100 * slot).written_behind == []  # no states: SGD


def test_the_step_pool_reads_the_first_two_sub_groups_left_to_it_during_backward() -> None:
    """Of the sub-groups the read-ahead pool does not read, the first two with states on the SSD are read early into
    the step pool; not one whose states are written behind (they would take read-ahead memory), nor one in the DRAM
    tier (nothing to read)."""
    slot = 4096
    five = [slot // 4] * 5
    everything = [True] * 5

    def early(budget_slots: float, states: list[bool] = everything) -> list[int]:
        return read_ahead_plan(five, 4, 2, everything, states, int(budget_slots * slot)).read_early

    assert early(0) == [0, 1]
    assert early(5) == [0, 1]  # every gradient kept: nothing read ahead, nothing written behind
    assert early(8) == [1, 2]  # sub-group 0 read ahead, the last one written behind
    assert early(0, states=[False, True, False, True, True]) == [1, 3]
    assert early(1000) == []  # everything carried


def test_a_read_ahead_that_leaves_no_staging_budget_is_refused(swap: Path) -> None:
    with pytest.raises(FuyouConfigError) as caught:
        load_fuyou_config(ds_config(swap, {"pinned_memory": "1GiB", "optimizer": {"read_ahead": "1GiB"}}))
    problem = caught.value.problems[0]
    assert problem.field == "fuyou.optimizer.read_ahead" and "pinned_memory" in problem.fix


def test_placement_auto_is_half_the_available_memory_after_the_pinned_budget(
    swap: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepspeed_fuyou.config import fuyou

    monkeypatch.setattr(fuyou, "available_host_memory", lambda: 20 << 30)
    auto = load_fuyou_config(ds_config(swap, {"pinned_memory": "4GiB"}))
    assert auto.placement.budget(auto.pinned_memory) == 8 << 30
    for size, budget in (("0", 0), ("3GiB", 3 << 30)):
        block = {"placement": {"host_memory": 0 if size == "0" else size}}
        assert load_fuyou_config(ds_config(swap, block)).placement.budget(4 << 30) == budget


def test_an_aio_queue_the_kernel_has_no_room_for_is_refused_before_anything_starts(
    swap: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "aio_events_left", lambda: 100)
    io = {"engine": "aio", "queue_depth": 32, "threads": 4}  # 128 events
    with pytest.raises(FuyouConfigError) as caught:
        load_fuyou_config(ds_config(swap, {"io": io}))
    assert caught.value.fields == ["fuyou.io.queue_depth"]
    assert "fs.aio-max-nr" in caught.value.fix
    assert load_fuyou_config(ds_config(swap, {"io": {**io, "threads": 3}})) is not None  # 96 events
    with pytest.warns(FuyouConfigWarning, match="thread engine"):  # "auto" falls back to threads instead
        assert load_fuyou_config(ds_config(swap, {"io": {**io, "engine": "auto"}})) is not None


def test_the_estimator_margin_is_kept_free_of_the_pinned_budget(swap: Path) -> None:
    block = {"pinned_memory": "900MiB", "io": {"block_size": "1MiB", "threads": 1}}
    assert load_fuyou_config(ds_config(swap, {**block, "estimator": {"host_memory": "1GiB", "margin": 0.05}}))
    with pytest.raises(FuyouConfigError) as caught:  # 1 GiB less 20 % leaves 819 MiB
        load_fuyou_config(ds_config(swap, {**block, "estimator": {"host_memory": "1GiB", "margin": 0.2}}))
    assert caught.value.fields == ["fuyou.pinned_memory"] and "20%" in caught.value.reason


def test_bounce_blocks_that_could_outgrow_host_memory_are_refused(swap: Path) -> None:
    block = {"io": {"block_size": "64MiB", "threads": 2}, "pinned_memory": "128MiB"}  # up to 1 GiB of bounce blocks
    assert load_fuyou_config(ds_config(swap, {**block, "estimator": {"host_memory": "64GiB"}}))
    with pytest.raises(FuyouConfigError) as caught:
        load_fuyou_config(ds_config(swap, {**block, "estimator": {"host_memory": "1GiB"}}))
    assert caught.value.fields == ["fuyou.io.block_size"]
    assert "bounce" in caught.value.reason


def test_the_readme_table_is_the_one_the_field_docstrings_generate() -> None:
    readme = (ROOT / "README.md").read_text()
    assert reference.with_table(readme) == readme, "run: python -m deepspeed_fuyou.config.reference --write README.md"
    documented = {line.split("`")[1] for line in reference.block_table().splitlines()[2:]}
    assert documented == {key for key, _ in reference.fields()}
    assert {"io.verify", "estimator.validate", "optimizer.read_ahead", "host_cache"} <= documented
