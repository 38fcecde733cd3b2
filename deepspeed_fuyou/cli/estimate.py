"""`fuyou estimate --model M --config ds.json`: will this training setup fit, on which device, and what to change.

The model (a Hugging Face id, a config.json or a model directory) is built on fake tensors: no weights are
downloaded or allocated, and one fake forward pass gives the activations autograd will save. Prints stock
ZeRO-Infinity and fuyou side by side, per rank: accelerator, pinned host, pageable host and SSD peaks with their
breakdown, then the verdict for the plan the config selects. Exits 0 when it fits, 3 when it does not, 2 when the
config or model is invalid. `--json` prints one JSON object instead (see the README for its keys). `--auto` searches
the fastest micro-batch, prefetch depth and pinned budget that fit at the same global batch, and `--write` saves
the resulting config.

With a `"fuyou"` block it also prints where fuyou places each kind of model state (DRAM tier or SSD), and with
`--time` its modelled step time: the SSD traffic of each phase priced with this machine's rates, measured on first
use and cached (`estimator.rates`: a few seconds of SSD probe on the configured paths, and the model cut to 8
layers run under ZeRO-Offload, half a minute on 2 cores), so that the estimate itself stays instant.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from deepspeed_fuyou.cli import plotting
from deepspeed_fuyou.cli.args import add_model_arguments, read_ds_config
from deepspeed_fuyou.config.fuyou import BLOCK, EstimatorOptions
from deepspeed_fuyou.config.sizes import format_size
from deepspeed_fuyou.errors import FuyouConfigError
from deepspeed_fuyou.estimator.auto import auto_configure
from deepspeed_fuyou.estimator.estimate import Estimate, Machine, RatesSource, estimate, measured_rates, placement
from deepspeed_fuyou.estimator.memory import COMPONENTS, DEVICES
from deepspeed_fuyou.estimator.rates import cache_path
from deepspeed_fuyou.estimator.step_time import StepTime

DOES_NOT_FIT = 3
DEVICE_NAMES = {"gpu": "accelerator", "pinned_host": "pinned host", "pageable_host": "pageable host", "ssd": "SSD"}


def run(args: argparse.Namespace) -> int:
    if args.write and not args.auto:
        raise FuyouConfigError("--write", args.write, "only --auto proposes a config to write", "add --auto")
    rates = measured_rates if args.time else None
    if not args.auto:
        result, extra, header = estimate_from_args(args, rates), {}, ""
    else:
        ds_config = read_ds_config(args.config)
        machine = machine_from_args(args, ds_config)
        proposal = auto_configure(
            args.model, ds_config, seq_len=args.seq_len, world_size=args.world_size, machine=machine, rates=rates
        )
        result, extra = proposal.estimate, {"config": proposal.ds_config, "changes": proposal.changes}
        header = "proposed by --auto:\n" + "".join(f"  {change}\n" for change in proposal.changes or ["no change"])
        if args.write:
            Path(args.write).write_text(json.dumps(proposal.ds_config, indent=2) + "\n")
            header += f"  written to {args.write}\n"
    if args.plot:
        draw(result, Path(args.plot))
    if args.json:
        print(json.dumps({**result.to_json(), **extra}, indent=2), file=args.stdout)
    else:
        print(header + render(result) + (f"\nplot: {args.plot}" if args.plot else ""), file=args.stdout)
    return 0 if result.fits else DOES_NOT_FIT


def estimate_from_args(args: argparse.Namespace, rates: RatesSource | None = None) -> Estimate:
    ds_config = read_ds_config(args.config)
    return estimate(
        args.model,
        ds_config,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        world_size=args.world_size,
        machine=machine_from_args(args, ds_config),
        rates=rates,
    )


def machine_from_args(args: argparse.Namespace, ds_config: dict) -> Machine:
    """The machine planned for: `--gpu-memory` / `--host-memory`, else `fuyou.estimator`, else this one."""
    block = ds_config.get(BLOCK)
    options = EstimatorOptions.parse((block or {}).get("estimator") or {}) if isinstance(block, dict) else None
    machine = Machine.detect(options)
    return replace(
        machine,
        gpu_memory=args.gpu_memory or machine.gpu_memory,
        host_memory=args.host_memory or machine.host_memory,
    )


def render(result: Estimate) -> str:
    """The side-by-side table and the verdict, for people."""
    inputs = result.inputs
    plans = [plan for plan in (result.stock, result.fuyou) if plan is not None]
    lines = [
        f"{inputs['model']}: {inputs['parameters'] / 1e6:.1f}M parameters, {inputs['dtype']}, micro-batch "
        f"{inputs['micro_batch']} x {inputs['seq_len']} tokens, {inputs['world_size']} rank(s); bytes per rank",
        "",
        f"{'':32}" + "".join(f"{plan.name + (' (selected)' if plan is result.chosen else ''):>20}" for plan in plans),
    ]
    for device in DEVICES:
        lines.append(
            f"{DEVICE_NAMES[device] + ' peak':32}"
            + "".join(f"{format_size(p.device(device).total):>20}" for p in plans)
        )
        for component in COMPONENTS:
            values = [getattr(p.device(device), component) for p in plans]
            if any(values):
                lines.append(f"  {component:30}" + "".join(f"{format_size(v):>20}" for v in values))
    if result.fuyou is not None:
        lines += ["", f"{'fuyou places':32}{'DRAM tier':>20}{'SSD':>20}"]
        for kind, tiers in placement(result.fuyou).items():
            lines.append(f"  {kind:30}{format_size(tiers['dram']):>20}{format_size(tiers['ssd']):>20}")
        swapped = result.fuyou.swapped
        if swapped["read_ahead_gradients"] or swapped["read_ahead_states"] or swapped["written_behind_states"]:
            lines.append(
                f"  read-ahead keeps {format_size(swapped['read_ahead_gradients'])} of gradients, reads "
                f"{format_size(swapped['read_ahead_states'])} of optimizer states during backward and writes "
                f"{format_size(swapped['written_behind_states'])} of them during the next backward"
            )
        if swapped["kept_parameters"]:
            lines.append(
                f"  the parameter window keeps up to {format_size(swapped['kept_parameters'])} of released partitions, "
                "which the next pass over the layers finds in memory"
            )
        if swapped["early_read_states"]:
            lines.append(
                f"  the step pool reads {format_size(swapped['early_read_states'])} of optimizer states during "
                "backward, for the first sub-groups it steps"
            )
    if result.step_time is not None:
        lines += ["", *render_step_time(result.step_time)]
    machine = result.machine
    accelerator = "shares host memory" if machine.accelerator_is_host else format_size(machine.gpu_memory)
    lines += [
        "",
        f"machine: accelerator {accelerator}, host {format_size(machine.host_memory)}, margin {machine.margin:.0%}",
    ]
    if result.fits:
        lines.append(f"verdict: fits ({result.chosen.name})")
    else:
        lines.append(f"verdict: does NOT fit ({result.chosen.name})")
        lines += [f"  - {problem}" for problem in result.problems]
        lines += ["what to change:", *[f"  - {suggestion}" for suggestion in result.suggestions]]
    return "\n".join(lines)


def draw(result: Estimate, output: Path) -> None:
    """One panel per device: a stacked bar per plan (stock, fuyou) by what the bytes hold, and the machine's memory
    where the verdict checks one (the accelerator's, and the host's for pinned and pageable together)."""
    pyplot = plotting.pyplot("--plot", output)
    plans = [plan for plan in (result.stock, result.fuyou) if plan is not None]
    figure, axes = pyplot.subplots(1, len(DEVICES), figsize=(3.2 * len(DEVICES), 4))
    colors = dict(zip(COMPONENTS, pyplot.get_cmap("tab10").colors, strict=False))
    limits = {"gpu": result.machine.gpu_memory, "pinned_host": None, "pageable_host": result.machine.host_memory}
    for axis, device in zip(axes, DEVICES, strict=True):
        for x, plan in enumerate(plans):
            bottom = 0.0
            for component in COMPONENTS:
                gib = getattr(plan.device(device), component) / 2**30
                label = component if (device, x) == (DEVICES[0], 0) else None
                axis.bar(x, gib, 0.6, bottom=bottom, color=colors[component], label=label)
                bottom += gib
        limit = limits.get(device)
        if limit and not (device == "gpu" and result.machine.accelerator_is_host):
            axis.axhline(limit / 2**30, color="black", linestyle="--", linewidth=1)
            axis.annotate("this machine", (0.02, limit / 2**30), xycoords=("axes fraction", "data"), fontsize=7)
        axis.set_xticks(range(len(plans)), [plan.name for plan in plans])
        axis.set_title(DEVICE_NAMES[device] + " peak")
        axis.set_ylabel("GiB")
        axis.grid(alpha=0.3, axis="y")
    inputs = result.inputs
    figure.suptitle(
        f"{inputs['model']}: {inputs['parameters'] / 1e6:.1f}M parameters, micro-batch {inputs['micro_batch']} x "
        f"{inputs['seq_len']} tokens, per rank"
    )
    figure.legend(loc="lower center", ncol=len(COMPONENTS), fontsize=8)
    plotting.save(figure, output, rect=(0, 0.07, 1, 1))


def render_step_time(step: StepTime) -> list[str]:
    lines = [
        f"modelled step (fuyou): {step.seconds:.2f} s, bound {step.bound_seconds:.2f} s by the {step.bottleneck}; "
        f"SSD {format_size(step.read_bytes)} read, {format_size(step.written_bytes)} written per step",
        f"  {'phase':22}{'seconds':>9}  {'bound by':10}{'waits s':>8}{'compute s':>10}{'optimizer s':>12}{'read':>12}"
        f"{'written':>12}",
    ]
    for phase in step.phases:
        lines.append(
            f"  {phase.name:22}{phase.seconds:>9.2f}  {phase.bound_by:10}{phase.waits_s:>8.2f}{phase.compute_s:>10.2f}"
            f"{phase.optimizer_s:>12.2f}{format_size(phase.read_bytes):>12}{format_size(phase.written_bytes):>12}"
        )
    if step.rates is not None:
        ssd, compute = step.rates.ssd, step.rates.compute
        lines.append(
            f"  rates: SSD {ssd.read / 1e9:.2f} GB/s read, {ssd.write / 1e9:.2f} written, {ssd.mixed / 1e9:.2f} both "
            f"at once, host CPU {ssd.cpu_per_byte_read * 1e9:.2f} s per GB read, {ssd.cpu_per_byte_written * 1e9:.2f} "
            f"written; per layer {compute.forward_per_layer * 1e3:.1f} ms forward, "
            f"{compute.backward_per_layer * 1e3:.1f} backward, {compute.step_per_layer * 1e3:.1f} optimizer "
            f"(measured once, cached in {cache_path()})"
        )
    return lines


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimate",
        help="predict accelerator, host and SSD memory of a model + DeepSpeed config, stock vs fuyou",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, required=True)
    parser.add_argument("--config", required=True, help="the DeepSpeed JSON config")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--auto",
        action="store_true",
        help="propose the fastest micro-batch, prefetch depth and pinned budget that fit (same global batch); with "
        "--time also the placement, overlap and read-ahead of the shortest modelled step",
    )
    parser.add_argument("--write", metavar="PATH", help="with --auto: write the proposed DeepSpeed config here")
    parser.add_argument("--plot", metavar="PNG", help="also draw each device's peak, stock against fuyou, into PNG")
    parser.add_argument(
        "--time",
        action="store_true",
        help="also model fuyou's step time (measures this machine's SSD and compute rates on first use, then cached)",
    )
    parser.set_defaults(run=run)
