"""The `"fuyou"` block under real DeepSpeed: which classes run, and that training is unchanged by them.

Every run here is `scripts/finetune.py` (the main job) or a probe program, one process per rank on the CPU
accelerator (the base comparison started by the `deepspeed` launcher as a user would, the others by `torchrun`,
which starts the same ranks sooner), the main job through `tests/programs/guarded.py`, which makes the other side's
swap classes raise when constructed: a fuyou run that completes built none of DeepSpeed's swappers, a stock run
built none of ours. Losses of fuyou, stock ZeRO-3 with CPU offload and stock ZeRO-Infinity (NVMe) must agree for
the same seed and data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from benchlib import comparison_config

from deepspeed_fuyou import checkpoints
from deepspeed_fuyou.config.fuyou import ActivationOptions, host_memory_bytes
from deepspeed_fuyou.estimator.estimate import Machine, estimate
from deepspeed_fuyou.estimator.model import build_fake_model, load_model_config
from deepspeed_fuyou.estimator.rates import ComputeRates, MachineRates, SsdRates
from tests.conftest import launch_failure, run_deepspeed

pytestmark = pytest.mark.launches  # every test here starts processes (run_tests.sh --fast leaves them out)

ROOT = Path(__file__).resolve().parent.parent
GUARDED = ROOT / "tests" / "programs" / "guarded.py"
FULL_STATE_PROBE = ROOT / "tests" / "programs" / "full_state_probe.py"
OVERLAP_PROBE = ROOT / "tests" / "programs" / "overlap_probe.py"
CORRUPTION_PROBE = ROOT / "tests" / "programs" / "corruption_probe.py"
CUT_SAVE = ROOT / "tests" / "programs" / "cut_save_finetune.py"
MODEL = ROOT / "configs" / "models" / "llama-tiny"  # the main job's default model
FUYOU_CONFIG = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
STEPS = 10
TRAINER_STEPS = 6
REL_TOL = 1e-5
HOST_ESTIMATE_TOLERANCE = 0.2
OFFLOAD_EVERY_ACTIVATION = {"offload": "all", "tier": "nvme", "min_tensor_size": 0}

Config = dict[str, Any]


def config_for(kind: str, root: Path, **top_level: Any) -> Config:
    """The shipped CPU config as fuyou (striped over two directories), stock CPU offload or stock NVMe offload."""
    swap_dirs = [root / "ssd0", root / "ssd1"] if kind == "fuyou" else [root / "stock-swap"]
    for directory in swap_dirs:
        directory.mkdir(parents=True, exist_ok=True)
    return comparison_config({**FUYOU_CONFIG, **top_level}, kind, swap_dirs)


def launch(
    program: Path, config: Config, workdir: Path, *args: str, ranks: int = 1, launcher: str = "torchrun"
) -> None:
    """Runs `program` with `launcher`, the config in a file; the side it does not select may not be built (see
    tests/programs/guarded.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "ds_config.json"
    config_path.write_text(json.dumps(config))
    forbid = "stock" if "fuyou" in config else "fuyou"
    result = run_deepspeed(
        program,
        "--deepspeed_config",
        str(config_path),
        *args,
        cwd=workdir,
        ranks=ranks,
        launcher=launcher,
        FORBID=forbid,
    )
    assert result.returncode == 0, f"{program.name} failed:\n{launch_failure(result)}"


def finetune(config: Config, workdir: Path, *args: str, ranks: int = 1, launcher: str = "torchrun") -> dict[str, Any]:
    """Runs the main job and returns its metrics."""
    metrics = workdir / "metrics.json"
    checkpoints = workdir / "checkpoints"
    arguments = ("--metrics", str(metrics), "--output-dir", str(checkpoints), *args)
    launch(GUARDED, config, workdir, *arguments, ranks=ranks, launcher=launcher)
    return json.loads(metrics.read_text())


def assert_losses_equal(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    assert actual == pytest.approx(expected, rel=REL_TOL), f"{actual}\n!=\n{expected}"


NO_CLIPPING = {"gradient_clipping": 0.0}
"""Variants without clipping: there `optimizer.overlap: "auto"` steps sub-groups during backward, elsewhere behind
the next forward (the shipped config clips at 1.0)."""


def with_overlap(config: Config, overlap: str | None) -> Config:
    """`config` with `fuyou.optimizer.overlap` set (None: the config's own, i.e. "auto")."""
    if overlap is not None and "fuyou" in config:
        options = config["fuyou"].get("optimizer", {})
        config["fuyou"] = {**config["fuyou"], "optimizer": {**options, "overlap": overlap}}
    return config


def read_ahead(size: str) -> Config:
    """A pinned budget small enough for several sub-groups of the tiny model, with `size` of it for read-ahead."""
    return {"fuyou": {**FUYOU_CONFIG["fuyou"], "pinned_memory": "80MiB", "optimizer": {"read_ahead": size}}}


READ_AHEAD = read_ahead("24MiB")
"""Every gradient of the tiny model (12.6 MiB) and the states of some of its sub-groups."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    """Runs by (kind, variant, overlap mode), each once per module: several tests compare the same reference runs."""
    root = tmp_path_factory.mktemp("finetune")
    done: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    loop = ("--steps", str(STEPS))
    trainer = ("--trainer", "--steps", str(TRAINER_STEPS))
    accumulation = {"gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 1}
    variants: dict[str, tuple[dict[str, Any], int, tuple[str, ...]]] = {
        "base": ({}, 1, loop),
        "no-clipping": (NO_CLIPPING, 1, loop),
        "accumulation": (accumulation, 1, loop),
        "accumulation-no-clipping": (accumulation | NO_CLIPPING, 1, loop),
        "tight-clipping": ({"gradient_clipping": 1e-4}, 1, loop),
        "two-ranks": ({"train_micro_batch_size_per_gpu": 1}, 2, loop),
        "two-ranks-no-clipping": ({"train_micro_batch_size_per_gpu": 1} | NO_CLIPPING, 2, loop),
        "bf16": ({"bf16": {"enabled": True}}, 1, loop),
        "trainer": ({}, 1, trainer),
        "trainer-no-clipping": (NO_CLIPPING, 1, trainer),
        "activations": ({"fuyou": {**FUYOU_CONFIG["fuyou"], "activations": OFFLOAD_EVERY_ACTIVATION}}, 1, loop),
        "host-tier": ({"fuyou": {**FUYOU_CONFIG["fuyou"], "placement": {"host_memory": "1GiB"}}}, 1, loop),
        "read-ahead": (READ_AHEAD, 1, loop),
        "read-ahead-no-clipping": (READ_AHEAD | NO_CLIPPING, 1, loop),
        "read-ahead-accumulation": (READ_AHEAD | accumulation, 1, loop),
        "read-ahead-some-gradients": (read_ahead("6MiB"), 1, loop),
        "no-read-ahead": ({"fuyou": {**FUYOU_CONFIG["fuyou"], "optimizer": {"read_ahead": 0}}}, 1, loop),
    }

    def run(kind: str, variant: str, overlap: str | None = None) -> dict[str, Any]:
        key = (kind, variant, overlap)
        if key not in done:
            overrides, ranks, args = variants[variant]
            workdir = root / f"{kind}-{variant}-{overlap or 'auto'}"
            config = with_overlap(config_for(kind, workdir, **overrides), overlap)
            launcher = "deepspeed" if variant == "base" else "torchrun"  # the base runs as a user starts them
            done[key] = finetune(config, workdir, *args, ranks=ranks, launcher=launcher)
            done[key]["workdir"] = workdir
        return done[key]

    return run


def test_fuyou_trains_exactly_like_stock_zero3_cpu_offload_and_zero_infinity(runs: Callable[..., Any]) -> None:
    fuyou, stock_cpu, stock_nvme = runs("fuyou", "base"), runs("stock-cpu", "base"), runs("stock-nvme", "base")
    assert_losses_equal(fuyou["losses"], stock_cpu["losses"])
    assert_losses_equal(fuyou["losses"], stock_nvme["losses"])
    assert fuyou["losses"][-1] < fuyou["losses"][0] - 1.0  # it learns: the comparison is not between two no-ops


def test_the_main_job_leaves_a_loss_plot_and_a_memory_io_plot_next_to_its_checkpoint(
    runs: Callable[..., Any],
) -> None:
    """The pictures a person looks at after a run (scripts/run_report.py), drawn from per-step series of the run's
    own length: RSS and pinned buffers at the end of each step, and the bytes the process moved to and from storage."""
    run = runs("fuyou", "base")
    steps = len(run["losses"])
    for series in ("rss_per_step_bytes", "pinned_per_step_bytes", "ssd_read_per_step_bytes"):
        assert len(run[series]) == steps
    assert all(rss > 0 for rss in run["rss_per_step_bytes"]) and sum(run["ssd_written_per_step_bytes"]) > 0
    for picture in ("loss.png", "memory_io.png"):
        assert (run["workdir"] / "checkpoints" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["fuyou", "stock-nvme"])
def test_host_memory_estimate_matches_the_pool_counters_and_peak_rss_of_the_run(
    runs: Callable[..., Any], kind: str
) -> None:
    """`fuyou estimate` for the run's model and config against what the process held (CPU accelerator)."""
    run = runs(kind, "base")
    config = json.loads((run["workdir"] / "ds_config.json").read_text())
    machine = Machine(gpu_memory=None, host_memory=host_memory_bytes())
    plan = estimate(MODEL, config, seq_len=128, machine=machine).chosen
    host = plan.gpu.total + plan.pinned_host.total + plan.pageable_host.total
    assert host == pytest.approx(run["peak_rss_bytes"], rel=HOST_ESTIMATE_TOLERANCE)
    assert run["pinned_peak_bytes"] <= plan.pinned_host.total
    if kind == "fuyou":  # the pool's own peak counter
        assert run["pinned_peak_bytes"] == pytest.approx(plan.pinned_host.buffers, rel=HOST_ESTIMATE_TOLERANCE)


def test_fuyou_moves_the_bytes_itself_and_leaves_no_swap_file(runs: Callable[..., Any]) -> None:
    fuyou, stock_nvme = runs("fuyou", "base"), runs("stock-nvme", "base")
    assert fuyou["fuyou_bytes_read"] > 0 and fuyou["fuyou_bytes_written"] > 0 and fuyou["pinned_peak_bytes"] > 0
    assert stock_nvme["fuyou_bytes_read"] == stock_nvme["fuyou_bytes_written"] == 0
    assert fuyou["ssd_bytes_written"] > 0  # /proc/self/io: the writes reached storage
    for stripe in ("ssd0", "ssd1"):
        assert list((fuyou["workdir"] / stripe).iterdir()) == []
    assert list((stock_nvme["workdir"] / "stock-swap").iterdir()), "stock leaves its swap folder (we do not)"


def test_fuyou_streams_gradients_to_the_ssd_instead_of_a_whole_model_host_buffer(runs: Callable[..., Any]) -> None:
    """Stock keeps every gradient partition in one fp32 host buffer; fuyou writes each to its sub-group's file.

    That the gradients still arrive whole is what the loss equivalences (with accumulation, clipping, two ranks) show.
    """
    fuyou, stock_nvme = runs("fuyou", "base"), runs("stock-nvme", "base")
    config = load_model_config(MODEL)
    params = sum(p.numel for p in build_fake_model(config).params)
    assert stock_nvme["host_gradient_buffer_bytes"] >= 4 * params
    assert fuyou["host_gradient_buffer_bytes"] == 0


def test_activation_offload_under_deepspeed_changes_no_loss_and_leaves_no_file(runs: Callable[..., Any]) -> None:
    offloaded, base = runs("fuyou", "activations"), runs("fuyou", "base")
    assert offloaded["losses"] == base["losses"]  # bit for bit: the same bytes come back
    assert base["activation_offloaded_bytes"] == 0
    # Exactly what the estimator's trace says one forward saves, every step: no gathered parameter was moved.
    saved = build_fake_model(load_model_config(MODEL)).saved_tensors(2, 128)
    per_step = saved.offloaded(ActivationOptions(**OFFLOAD_EVERY_ACTIVATION))
    assert offloaded["activation_offloaded_bytes"] == STEPS * per_step
    assert offloaded["activation_read_bytes"] > 0
    for stripe in ("ssd0", "ssd1"):
        assert list((offloaded["workdir"] / stripe).iterdir()) == []


@pytest.mark.parametrize("overlap", ["off", None, "forward"])
def test_every_overlap_mode_trains_exactly_like_stock_zero_infinity(
    runs: Callable[..., Any], overlap: str | None
) -> None:
    """Sub-groups stepped after backward, during it ("auto" without clipping: the overlap probe below shows it is
    "backward"), or behind the next forward: the same updates in every mode."""
    assert_losses_equal(runs("fuyou", "no-clipping", overlap)["losses"], runs("stock-nvme", "no-clipping")["losses"])


@pytest.mark.parametrize("variant", ["accumulation", "accumulation-no-clipping"])
def test_fuyou_equals_stock_with_gradient_accumulation(runs: Callable[..., Any], variant: str) -> None:
    """Stepped behind the next forward (clipping) and during backward (none), after two micro-batches each."""
    assert_losses_equal(runs("fuyou", variant)["losses"], runs("stock-nvme", variant)["losses"])


@pytest.mark.parametrize("overlap", [None, "off"])
def test_fuyou_equals_stock_when_gradient_clipping_binds(runs: Callable[..., Any], overlap: str | None) -> None:
    """Clipping needs the global norm first: "auto" steps behind the next forward; "off" in step()."""
    fuyou = runs("fuyou", "tight-clipping", overlap)
    assert_losses_equal(fuyou["losses"], runs("stock-nvme", "tight-clipping")["losses"])
    unclipped = runs("fuyou", "base")["losses"]
    # Adam is nearly blind to a uniform gradient scale; at 1e-4 the clipped gradients meet eps and steps change
    assert fuyou["losses"][2:] != pytest.approx(unclipped[2:], rel=1e-3), "clipping changed nothing"


@pytest.mark.parametrize("variant", ["two-ranks", "two-ranks-no-clipping"])
def test_fuyou_equals_stock_with_two_ranks_over_gloo(runs: Callable[..., Any], variant: str) -> None:
    assert_losses_equal(runs("fuyou", variant)["losses"], runs("stock-nvme", variant)["losses"])


def test_fuyou_equals_stock_zero3_in_bf16(runs: Callable[..., Any]) -> None:
    """Parameters swapped as 2-byte elements: a norm's 256 are 512 bytes, an MLP matrix's 176,128 are 344 KiB,
    neither a whole number of I/O blocks; our swappers pad and align them where stock sizes its buffers by hand.

    The reference is stock ZeRO-Offload (parameters in host memory): stock ZeRO-Infinity in bf16 once gave another
    first loss in a full suite run (5.652126 against 5.652045, before any update), and the same value as this
    otherwise; the bytes of its own NVMe parameter path are not always those it wrote."""
    fuyou = runs("fuyou", "bf16")
    assert_losses_equal(fuyou["losses"], runs("stock-cpu", "bf16")["losses"])
    assert fuyou["losses"] != pytest.approx(runs("fuyou", "base")["losses"], rel=1e-4), "bf16 changed nothing"


@pytest.mark.parametrize("variant", ["base", "no-clipping"])
def test_resuming_from_a_checkpoint_in_a_fresh_process_continues_the_same_run(
    runs: Callable[..., Any], tmp_path: Path, variant: str
) -> None:
    """With the optimizer stepping behind the next forward (base) or during backward (no clipping): the checkpoint
    holds the state of every step taken, none pending."""
    uninterrupted = runs("fuyou", variant)["losses"]
    config = config_for("fuyou", tmp_path, **({} if variant == "base" else NO_CLIPPING))
    first = finetune(config, tmp_path, "--steps", "5")
    second = finetune(config, tmp_path, "--steps", str(STEPS), "--resume")
    assert second["first_step"] == 5
    assert_losses_equal(first["losses"] + second["losses"], uninterrupted)
    assert (tmp_path / "checkpoints" / "step5").is_dir() and (tmp_path / "checkpoints" / f"step{STEPS}").is_dir()


def cut_during_save(config: Config, workdir: Path, copy: int, *args: str) -> None:
    """Runs the main job killed in the middle of its `copy`-th checkpoint copy (`cut_save_finetune`)."""
    config_path = workdir / "ds_config.json"
    config_path.write_text(json.dumps(config))
    arguments = ("--deepspeed_config", str(config_path), "--output-dir", str(workdir / "checkpoints"), *args)
    result = run_deepspeed(CUT_SAVE, *arguments, cwd=workdir, FORBID="stock", CUT_AT_COPY=str(copy))
    assert result.returncode != 0, "the save was not cut off"


def test_a_save_cut_off_by_a_kill_leaves_the_previous_checkpoint_and_resuming_from_it_continues_the_run(
    runs: Callable[..., Any], tmp_path: Path
) -> None:
    uninterrupted = runs("fuyou", "base")["losses"]
    config = config_for("fuyou", tmp_path)
    cut_during_save(config, tmp_path, 2, "--steps", str(STEPS), "--save-at", "5")
    saved, last = tmp_path / "checkpoints", f"step{STEPS}"
    assert checkpoints.latest_tag(saved) == "step5" and checkpoints.complete_tags(saved) == ["step5"]
    assert (saved / checkpoints.partial_tag(last)).is_dir()
    resumed = finetune(config, tmp_path, "--steps", str(STEPS), "--resume")  # and saves `last` over the cut one
    assert resumed["first_step"] == 5
    assert_losses_equal(resumed["losses"], uninterrupted[5:])
    assert checkpoints.complete_tags(saved) == ["step5", last] and checkpoints.latest_tag(saved) == last
    assert not (saved / checkpoints.partial_tag(last)).exists()


def test_resuming_when_the_only_save_was_cut_off_says_there_is_no_complete_checkpoint(tmp_path: Path) -> None:
    config = config_for("fuyou", tmp_path)
    cut_during_save(config, tmp_path, 1, "--steps", "2")
    (tmp_path / "ds_config.json").write_text(json.dumps(config))
    arguments = ("--deepspeed_config", "ds_config.json", "--output-dir", "checkpoints", "--steps", "2", "--resume")
    # the `deepspeed` launcher, as a user starts it: what it prints is what this test shows (torchrun adds its own
    # traceback of the failed child)
    result = run_deepspeed(GUARDED, *arguments, cwd=tmp_path, launcher="deepspeed", FORBID="stock")
    assert result.returncode != 0
    assert "no complete checkpoint" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("variant", ["trainer", "trainer-no-clipping"])
def test_hf_trainer_runs_the_same_config_like_stock_and_resumes_from_its_checkpoint(
    runs: Callable[..., Any], tmp_path: Path, variant: str
) -> None:
    """`TrainingArguments(deepspeed=config)`: the Trainer's own loop, saving and resuming, with our swappers, the
    optimizer stepped behind the next forward (the Trainer clips) or during backward (`max_grad_norm` 0; resuming in
    that mode is the engine loop's test)."""
    fuyou = runs("fuyou", variant)
    assert_losses_equal(fuyou["losses"], runs("stock-cpu", variant)["losses"])
    assert fuyou["fuyou_bytes_read"] > 0
    if variant != "trainer":
        return
    config = config_for("fuyou", tmp_path)
    half = TRAINER_STEPS // 2
    first = finetune(config, tmp_path, "--trainer", "--steps", str(half))
    second = finetune(config, tmp_path, "--trainer", "--steps", str(TRAINER_STEPS), "--resume")
    assert (tmp_path / "checkpoints" / f"checkpoint-{half}" / f"global_step{half}").is_dir()
    assert_losses_equal(first["losses"] + second["losses"], fuyou["losses"])


def test_full_state_api_reads_and_writes_through_our_swapper_exactly_as_stock_zero_infinity(tmp_path: Path) -> None:
    """`safe_get_full_grad`, `safe_{get,set}_full_fp32_param` and `safe_{get,set}_full_optimizer_state` mid-training.

    With optimizer states on the SSD each call swaps a sub-group in, and a set must be written back: the losses after
    the set (which trains from the set values) match stock's only if our swapper wrote them.
    """
    results = {}
    for kind in ("fuyou", "stock-nvme"):
        workdir = tmp_path / kind
        launch(FULL_STATE_PROBE, config_for(kind, workdir), workdir, "--out", str(workdir / "state.json"))
        results[kind] = json.loads((workdir / "state.json").read_text())
    fuyou, stock = results["fuyou"], results["stock-nvme"]
    assert (fuyou["optimizer"], fuyou["optimizer_swapper"]) == ("FuyouZeroOptimizer", "FuyouOptimizerSwapper")
    assert stock["optimizer_swapper"] == "PartitionedOptimizerSwapper"
    for reading in ("grad", "fp32", "exp_avg", "exp_avg_sq", "fp32_after_set"):
        for name, values in stock[reading].items():
            assert fuyou[reading][name] == pytest.approx(values, rel=REL_TOL, abs=1e-12), (reading, name)
    assert all(all(same) for same in fuyou["set_then_get"].values())
    assert_losses_equal(fuyou["losses_after_set"], stock["losses_after_set"])


def test_each_overlap_mode_steps_the_sub_groups_when_it_says(tmp_path: Path) -> None:
    """What each `optimizer.overlap` value changes, seen from inside the optimizer (tests/programs/overlap_probe.py),
    with a budget small enough for several sub-groups: "off" steps every sub-group in `step()` on the training
    thread; "backward" hands sub-groups to the step thread while autograd's backward runs, and no gradient of the
    boundary goes to the SSD; "forward" returns from `step()` before any sub-group is stepped, and the next forward
    waits for the update of a parameter it fetches."""
    config = config_for("fuyou", tmp_path)
    config["fuyou"]["pinned_memory"] = "48MiB"
    launch(OVERLAP_PROBE, config, tmp_path, "--out", str(tmp_path / "overlap.json"))
    result = json.loads((tmp_path / "overlap.json").read_text())
    off, backward, forward = result["off"], result["backward"], result["forward"]
    assert (off["mode"], backward["mode"], forward["mode"]) == ("off", "backward", "forward")
    assert min(r["sub_groups"] for r in result.values()) >= 3
    assert off["adam"] and all(a == {"where": "main thread", "inside_step": True} for a in off["adam"])
    assert off["queued_during_backward"] == 0 and off["gradient_pieces_written_at_boundary"] > 0
    assert backward["queued_during_backward"] >= 2
    assert backward["gradient_pieces_written_at_boundary"] == 0
    assert any(a["where"] == "step thread" for a in backward["adam"])
    assert forward["adam_before_step_returned"] == 0 and forward["pending_after_step"]
    assert forward["forward_waited_for_update"]
    assert forward["adam"] and all(a["where"] == "step thread" for a in forward["adam"])
    assert forward["queued_during_backward"] == 0 and forward["gradient_pieces_written_at_boundary"] > 0
    assert forward["losses"] == off["losses"]  # the same config; only when the sub-groups were stepped differs


def test_a_swap_file_corrupted_mid_run_stops_training_at_its_next_read_in_every_overlap_mode(tmp_path: Path) -> None:
    """4 KiB of random bytes written over a master-weights file between steps (tests/programs/corruption_probe.py):
    the next read of it raises FuyouIOError naming that file and the checksums, and no step completes after it,
    whichever thread (training or step thread) reads it first. Without checksums this trained on to NaN.

    "off" and "backward" read it in the next forward (the parameters are read from the master in fp32). "forward"
    hands the updated parameters to the next forward in memory, and that iteration's backward finds them still in
    memory (kept after their release), so its loss comes from intact values; the step behind the forward after it
    reads the master and raises."""
    launch(CORRUPTION_PROBE, config_for("fuyou", tmp_path), tmp_path, "--out", str(tmp_path / "corruption.json"))
    result = json.loads((tmp_path / "corruption.json").read_text())
    assert [r["mode"] for r in result.values()] == ["off", "backward", "forward"]
    for record in result.values():
        assert all(math.isfinite(loss) for loss in record["losses_before"]) and len(record["losses_before"]) == 2
        assert len(record["losses_after"]) == (1 if record["mode"] == "forward" else 0), record
        error = record["error"]
        assert (error["type"], error["path"], error["offset"]) == ("FuyouIOError", record["corrupted"], 0), error
        assert "checksum mismatch" in error["message"]


def test_a_host_memory_budget_that_holds_everything_takes_the_ssd_out_of_training(runs: Callable[..., Any]) -> None:
    """`placement.host_memory` large enough for parameters, gradients and every sub-group: no byte goes through the
    SSD, not even at start-up, and the run trains exactly as stock ZeRO-Infinity."""
    tier, base = runs("fuyou", "host-tier"), runs("fuyou", "base")
    assert_losses_equal(tier["losses"], runs("stock-nvme", "base")["losses"])
    assert tier["fuyou_bytes_read"] == tier["fuyou_bytes_written"] == 0
    assert base["fuyou_bytes_read"] > 0 and base["fuyou_bytes_written"] > 0


TRAFFIC_TOLERANCE = 0.03
"""The model takes the parameters a backward finds still gathered from its forward to be `max_live_parameters`;
stage 3 releases whole parameters, so it keeps up to one more."""


def traffic_per_step(run: dict[str, Any], direction: str, kind: str = "") -> float:
    """Swap bytes the run moved in `direction` ("read", "written") per step, of one `kind` ("parameters", ...) or of
    all, averaged over the steps after the first two: the first one's backward reads every parameter again, and the
    first optimizer step reads no moments (Adam creates them there), which in "forward" falls in the second step,
    since a step's work runs during the next one."""
    later = run["swap_traffic_per_step"][2:]
    moved = (v for step in later for key, v in step.items() if key.startswith(kind) and key.endswith(f"_{direction}"))
    return sum(moved) / len(later)


def timed_estimate(run: dict[str, Any]) -> Any:
    """`fuyou estimate --time` for the run's config (`step_time`); the traffic needs no real rates."""
    config = json.loads((run["workdir"] / "ds_config.json").read_text())
    machine = Machine(gpu_memory=None, host_memory=host_memory_bytes())
    fixed = MachineRates(SsdRates(1e9, 1e9, 1e9, 0.0, 0.0), ComputeRates(*[1e-3] * 6))
    return estimate(MODEL, config, seq_len=128, machine=machine, rates=lambda *_: fixed)


@pytest.mark.parametrize(
    ("variant", "overlap"),
    [
        ("no-clipping", "off"),
        ("no-clipping", None),  # "backward"
        ("accumulation-no-clipping", None),  # "backward", two micro-steps
        ("read-ahead-no-clipping", "off"),  # sub-groups carried across the end of backward
    ],
)
def test_the_modelled_ssd_traffic_of_a_step_is_what_the_run_moved(
    runs: Callable[..., Any], variant: str, overlap: str | None
) -> None:
    """The step-time model's bytes against the swap runtime's counters, stepping after backward or during it, with
    and without gradient accumulation."""
    run = runs("fuyou", variant, overlap)
    step = timed_estimate(run).step_time
    assert traffic_per_step(run, "read") == pytest.approx(step.read_bytes, rel=TRAFFIC_TOLERANCE)
    assert traffic_per_step(run, "written") == pytest.approx(step.written_bytes, rel=TRAFFIC_TOLERANCE)


@pytest.mark.parametrize(
    ("variant", "reference"),
    [("base", None), ("accumulation", None), ("read-ahead", "base"), ("read-ahead-accumulation", "accumulation")],
)
def test_stepping_behind_the_forward_hands_the_updated_parameters_to_it_in_memory(
    runs: Callable[..., Any], variant: str, reference: str | None
) -> None:
    """With "forward" each sub-group's step hands its updated partitions over to the next forward, which takes them
    instead of reading them back. The step keeps two sub-groups' at most (`HAND_OVER_SUB_GROUPS`) and waits for the
    forward to take them; a master read ahead during backward is kept whatever the limit.

    The tiny model is one sub-group: every partition is taken, none pushed out. With read-ahead's small budget it is
    many, stepped faster than the forward: the run reads about what the one-sub-group run reads per step (its
    backward's), where it read one more copy of the parameters when the step ran ahead of the forward. The model
    counts no parameter read in that forward; the backward may read up to one more copy than it counts on this tiny
    model (it takes the backward to find `max_live_parameters` still gathered from the forward)."""
    run = runs("fuyou", variant)
    result = timed_estimate(run)
    step, one_copy = result.step_time, result.fuyou.swapped["parameters"]
    if reference is None:
        assert run["hand_over_pushed_out_bytes"] == 0
        assert run["hand_over_taken_bytes"] >= (STEPS - 1) * one_copy  # each step but the last has a forward after it
    else:
        reference_reads = traffic_per_step(runs("fuyou", reference), "read", "parameters")
        assert traffic_per_step(run, "read", "parameters") <= reference_reads + one_copy / 10
    assert traffic_per_step(run, "written") == pytest.approx(step.written_bytes, rel=TRAFFIC_TOLERANCE)
    read = traffic_per_step(run, "read")
    assert step.read_bytes * (1 - TRAFFIC_TOLERANCE) <= read <= step.read_bytes * (1 + TRAFFIC_TOLERANCE) + one_copy


@pytest.mark.parametrize(
    ("variant", "overlap", "reference"),
    [
        ("read-ahead", None, "base"),  # "forward"
        ("read-ahead", "off", "base"),
        ("read-ahead-accumulation", None, "accumulation"),
        ("no-read-ahead", None, "base"),  # nothing carried: every gradient through its file
    ],
)
def test_sub_groups_carried_across_the_end_of_backward_train_exactly_like_stock(
    runs: Callable[..., Any], variant: str, overlap: str | None, reference: str
) -> None:
    assert_losses_equal(runs("fuyou", variant, overlap)["losses"], runs("stock-nvme", reference)["losses"])


@pytest.mark.parametrize(
    ("variant", "overlap", "every_gradient", "states"),
    [
        ("read-ahead", None, True, True),  # "forward"
        ("read-ahead", "off", True, True),
        ("read-ahead-some-gradients", "off", False, False),
    ],
)
def test_read_ahead_keeps_gradients_off_the_ssd_then_reads_states_during_backward(
    runs: Callable[..., Any], variant: str, overlap: str | None, every_gradient: bool, states: bool
) -> None:
    """`optimizer.read_ahead`: the kept gradients never reach their files, every step, and what it carries is what
    the estimator says: gradients first, then the states of the first sub-groups with what is left."""
    run = runs("fuyou", variant, overlap)
    swapped = timed_estimate(run).fuyou.swapped
    kept = swapped["read_ahead_gradients"]
    assert (kept == swapped["gradients"]) if every_gradient else (0 < kept < swapped["gradients"])
    assert (
        (0 < swapped["read_ahead_states"] < swapped["optimizer_states"]) if states else not swapped["read_ahead_states"]
    )
    for step in run["swap_traffic_per_step"]:
        assert step["gradients_written"] == swapped["gradients"] - kept
    for step in run["swap_traffic_per_step"][1:]:
        assert step["gradients_read"] == swapped["gradients"] - kept


def test_the_default_read_ahead_carries_what_the_parameter_window_leaves_of_its_half_of_the_pinned_budget(
    runs: Callable[..., Any],
) -> None:
    """`optimizer.read_ahead: "auto"` (the shipped config leaves it so): once the model is known, the forward/backward
    pool shrinks to what its window needs and the rest of its half of the 2 GiB carries every gradient of the tiny
    model past the SSD, as the estimate says; with `read_ahead: 0` the same run writes them all, every step."""
    auto, none = runs("fuyou", "base"), runs("fuyou", "no-read-ahead")
    half = 1 << 30
    assert auto["pinned_forward_backward_peak_bytes"] <= auto["pinned_forward_backward_budget_bytes"]
    assert auto["pinned_forward_backward_budget_bytes"] + auto["pinned_read_ahead_budget_bytes"] == half
    assert none["pinned_forward_backward_budget_bytes"] == half and none["pinned_read_ahead_budget_bytes"] == 0
    swapped = timed_estimate(auto).fuyou.swapped
    assert swapped["read_ahead_gradients"] == swapped["gradients"] > 0
    assert all(step["gradients_written"] == 0 for step in auto["swap_traffic_per_step"])
    assert all(step["gradients_written"] == swapped["gradients"] for step in none["swap_traffic_per_step"])


def test_the_read_ahead_pool_holds_what_is_carried_and_the_estimate_counts_it(runs: Callable[..., Any]) -> None:
    """What the read-ahead pool holds is a slot of the largest sub-group's size for each carried gradient, master and
    state: at the end of backward every kept gradient and every state read ahead at once, and at most what the
    estimator says (the states written behind have left before the ones read ahead come); the pinned peak it
    predicts includes it."""
    run = runs("fuyou", "read-ahead")
    plan = timed_estimate(run).fuyou
    swapped = plan.swapped
    carried = swapped["read_ahead_gradients"] + swapped["read_ahead_states"]
    assert carried > 0 and swapped["written_behind_states"] > 0
    assert carried <= run["pinned_read_ahead_peak_in_use_bytes"] <= plan.read_ahead_pool
    assert run["pinned_peak_bytes"] <= plan.pinned_host.buffers
