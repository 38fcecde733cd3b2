"""Reliability soak: the main job for many steps, a corrupted block injected while it trains, and the recovery.

Three runs of the main job (scripts/finetune.py, launched by `deepspeed`, the shipped CPU config, a checkpoint every
`--every` steps), on the same data:
1. uninterrupted, `--steps` steps: the reference losses;
2. the same, while this script overwrites 4 KiB of a random optimizer swap file (master weights or a moment of a
   random sub-group) at a random moment after a random checkpoint is complete, as a failing SSD or another program
   would. The run must stop with the checksum error (exit status not 0, "checksum mismatch" and the file in its
   output), and no checkpoint may be completed after the corruption. A corruption the run overwrites before it
   reads it back (the step was rewriting that very file) is not an error: then another one is injected;
3. `--resume`: from the newest complete checkpoint to `--steps`, losses equal to the reference's.
Prints a table and appends it to benchmarks/RESULTS.md.

    python scripts/bench_soak.py --steps 1000 --every 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import append_result, comparison_config, corrupt, table

from deepspeed_fuyou import checkpoints

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = ROOT / "scripts" / "finetune.py"
LOSS_TOLERANCE = 1e-5  # relative, as the equivalence tests: bit-identical in practice
INJECTIONS = 5  # corruptions tried on one run before the soak gives up (each one overwritten before it was read)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100, help="save a checkpoint every this many steps")
    parser.add_argument("--seed", type=int, default=None, help="of the corruption's moment and place (default: random)")
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()), help="SSD directory to swap to")
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(workdir: Path, *args: str) -> subprocess.Popen[bytes]:
    """Starts the main job in `workdir` (config `ds.json`, output `checkpoints/`, metrics `metrics.json`)."""
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port())]
    command += [str(FINETUNE), "--deepspeed_config", "ds.json", "--output-dir", "checkpoints"]
    command += ["--metrics", "metrics.json", *args]
    log = (workdir / "job.log").open("ab")
    environment = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    return subprocess.Popen(command, cwd=workdir, env=environment, stdout=log, stderr=subprocess.STDOUT)


def prepare(workdir: Path) -> None:
    swap = workdir / "ssd"
    swap.mkdir(parents=True)
    base = json.loads((ROOT / "configs" / "fuyou_cpu.json").read_text())
    (workdir / "ds.json").write_text(json.dumps(comparison_config(base, "fuyou", [swap])))


def corrupt_one_file(swap: Path, rng: random.Random) -> tuple[Path, int, bytes] | None:
    """Overwrites 4 KiB of a random optimizer swap file at a random 4 KiB-aligned offset: (file, offset, bytes)."""
    files = sorted(p for p in swap.glob("fuyou-swap-*/optim-*") if p.stat().st_size >= 4096)
    if not files:
        return None
    target = rng.choice(files)
    offset = rng.randrange(target.stat().st_size // 4096) * 4096
    data = rng.randbytes(4096)
    corrupt(target, offset, data)
    return target, offset, data


def still_there(injected: tuple[Path, int, bytes]) -> bool:
    """Whether the file still holds the injected bytes (False once the run rewrote them; True once it is gone)."""
    target, offset, data = injected
    try:
        fd = os.open(target, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        return os.pread(fd, len(data), offset) == data
    finally:
        os.close(fd)


def corrupted_run(workdir: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Run 2: the job, corrupted after a random checkpoint; what happened.

    The run rewrites every optimizer file once per step, so a corruption can land on a file whose step is under way
    and be overwritten before anything reads it (this script watches the bytes): then another is injected."""
    saves = [f"--save-at={step}" for step in range(args.every, args.steps, args.every)]
    job = launch(workdir, "--steps", str(args.steps), *saves)
    after = rng.randrange(1, args.steps // args.every - 1) * args.every  # leaves at least a checkpoint interval
    saved = workdir / "checkpoints"
    while job.poll() is None and f"step{after}" not in checkpoints.complete_tags(saved):
        time.sleep(0.2)
    injected: list[tuple[float, Path]] = []
    overwritten = 0
    while job.poll() is None and len(injected) < INJECTIONS:
        time.sleep(rng.uniform(0, 3))
        injection = corrupt_one_file(workdir / "ssd", rng)
        if injection is None:
            continue
        injected.append((time.time(), injection[0]))
        while job.poll() is None and still_there(injection):
            time.sleep(0.05)
        overwritten += job.poll() is None
    if job.poll() is None:  # every corruption was overwritten before it was read
        job.kill()
    job.wait()
    output = (workdir / "job.log").read_text(errors="replace")
    last_at = injected[-1][0] if injected else float("inf")  # the corruption no write of the run took back
    marks = {tag: (saved / tag / checkpoints.COMPLETE).stat().st_mtime for tag in checkpoints.complete_tags(saved)}
    return {
        "after_checkpoint": after,
        "injections": len(injected),
        "overwritten": overwritten,
        "files": [target.name for _, target in injected],
        "exit_status": job.returncode,
        "checksum_error": "checksum mismatch" in output and str(injected[-1][1]) in output if injected else False,
        "checkpoints": sorted(marks, key=marks.get),
        "saved_after_corruption": [tag for tag, mtime in marks.items() if mtime > last_at],
    }


def finished_run(workdir: Path, *args: str) -> dict[str, Any]:
    job = launch(workdir, *args)
    if job.wait() != 0:
        raise SystemExit(f"the main job failed in {workdir}:\n{(workdir / 'job.log').read_text()[-4000:]}")
    return json.loads((workdir / "metrics.json").read_text())


def main() -> None:
    args = parse_args()
    if args.steps < 3 * args.every:
        raise SystemExit("--steps must leave room for a corruption after a checkpoint (>= 3 x --every)")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fuyou-soak-", dir=args.path) as scratch:
        reference_dir, soak_dir = Path(scratch) / "reference", Path(scratch) / "soak"
        prepare(reference_dir)
        prepare(soak_dir)
        start = time.perf_counter()
        reference = finished_run(reference_dir, "--steps", str(args.steps), "--no-final-save")
        reference_s = time.perf_counter() - start
        corrupted = corrupted_run(soak_dir, args, rng)
        resumed = finished_run(soak_dir, "--steps", str(args.steps), "--resume", "--no-final-save")
    first = resumed["first_step"]
    differences = [abs(a - b) / abs(b) for a, b in zip(resumed["losses"], reference["losses"][first:], strict=True)]
    verdict = (
        corrupted["exit_status"] != 0
        and corrupted["checksum_error"]
        and not corrupted["saved_after_corruption"]
        and max(differences, default=0.0) <= LOSS_TOLERANCE
    )
    header = ["what", "result"]
    rows = [
        [
            "reference run",
            f"{args.steps} steps in {reference_s:.0f} s, peak RSS {reference['peak_rss_bytes'] / 2**30:.2f} GiB",
        ],
        [
            "corrupted",
            f"after checkpoint step{corrupted['after_checkpoint']}: {', '.join(corrupted['files'])} "
            f"({corrupted['injections']} injection(s), {corrupted['overwritten']} overwritten by the run unread)",
        ],
        [
            "the run",
            f"exit status {corrupted['exit_status']}, checksum error naming the file: {corrupted['checksum_error']}",
        ],
        ["complete checkpoints", ", ".join(corrupted["checkpoints"]) or "none"],
        ["completed after the corruption", ", ".join(corrupted["saved_after_corruption"]) or "none"],
        [
            "resumed",
            f"from step {first}, {len(differences)} steps, largest relative loss difference "
            f"{max(differences, default=0.0):g}",
        ],
        ["verdict", "pass" if verdict else "FAIL"],
    ]
    body = f"seed {seed}, {args.steps} steps, a checkpoint every {args.every}\n\n```\n{table(header, rows)}\n```"
    print(body)
    if not args.no_record:
        append_result("bench_soak: a corrupted block mid-run, and the recovery", [str(args.path)], body)
    if not verdict:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
