"""Reliability soak: the main job for many steps, a corrupted block injected while it trains, kills, and recovery.

Corruption (`--steps`, 0 to skip): three runs of the main job (scripts/finetune.py, launched by `deepspeed`, the
shipped CPU config, a checkpoint every `--every` steps), on the same data:
1. uninterrupted, `--steps` steps: the reference losses;
2. the same, while this script overwrites 4 KiB of a random optimizer swap file (master weights or a moment of a
   random sub-group) at a random moment after a random checkpoint is complete, as a failing SSD or another program
   would. The run must stop with the checksum error (exit status not 0, "checksum mismatch" and the file in its
   output), and no checkpoint may be completed after the corruption. A corruption the run overwrites before it
   reads it back (the step was rewriting that very file) is not an error: then another one is injected;
3. `--resume`: from the newest complete checkpoint to `--steps`, the reference's losses bit for bit.

Kills (`--kills`, 0 to skip): a short job that saves every other step is killed (SIGKILL to all its processes) at a
random moment once it is training (up to 2 s after it completed its first checkpoint, about two steps and a save;
every other kill within 0.3 s of the start of a save), `--kills` times, each restart resuming from `latest` (or
starting afresh when there is none). After every kill `latest` must name a complete checkpoint; the last run goes
to the end, with an uninterrupted run's losses bit for bit.

Prints a table and appends it to benchmarks/RESULTS.md.

    python scripts/bench_soak.py --steps 1000 --every 100 --kills 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import append_result, comparison_config, corrupt, main_job_command, table

from deepspeed_fuyou import checkpoints
from deepspeed_fuyou.distributed import free_port, shared_memory_buffers
from deepspeed_fuyou.errors import FuyouIOError

ROOT = Path(__file__).resolve().parent.parent
# A resumed run's losses must equal the uninterrupted run's bit for bit: the weights, moments and step counts are
# restored exactly, and so are the beta powers of DeepSpeed's CPU Adam (`FuyouZeroOptimizer._replay_adam_step_count`).
KILL_STEPS = 120  # the kill phase's job: saving every other step; 20 kills leave it about half done
KILL_WINDOW_S = 2.0  # a kill lands up to this long after the restarted job completed its first checkpoint
IN_SAVE_WINDOW_S = 0.3  # every other kill lands up to this long after a save began (its partial directory appeared)
START_LIMIT_S = 300  # a job that completes no checkpoint in this time is killed anyway
PARTIAL = checkpoints.PARTIAL_SUFFIX
INJECTIONS = 5  # corruptions tried on one run before the soak gives up (each one overwritten before it was read)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="of the corruption soak (0: skip it)")
    parser.add_argument("--every", type=int, default=100, help="save a checkpoint every this many steps")
    parser.add_argument("--kills", type=int, default=20, help="kills of the kill phase (0: skip it)")
    parser.add_argument("--seed", type=int, default=None, help="of the random moments and places (default: random)")
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()), help="SSD directory to swap to")
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args()


def launch(workdir: Path, *args: str, port: int | None = None) -> subprocess.Popen[bytes]:
    """Starts the main job in `workdir` (config `ds.json`, output `checkpoints/`, metrics `metrics.json`), in a
    process group of its own."""
    command = main_job_command(
        "ds.json", port or free_port(), "--output-dir", "checkpoints", "--metrics", "metrics.json"
    )
    command += args
    log = (workdir / "job.log").open("ab")
    environment = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    return subprocess.Popen(
        command, cwd=workdir, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


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


def killed_runs(workdir: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """The kill phase: what each kill left, and the last run's metrics."""
    saved = workdir / "checkpoints"
    saves = [f"--save-at={step}" for step in range(2, KILL_STEPS, 2)]
    left_a_partial = consistent = 0
    for kill in range(args.kills):
        resume = ["--resume"] if checkpoints.latest_tag(saved) is not None else []
        port = free_port()
        before = set(checkpoints.complete_tags(saved))
        job = launch(workdir, "--steps", str(KILL_STEPS), *saves, *resume, port=port)
        deadline = time.monotonic() + START_LIMIT_S
        while job.poll() is None and time.monotonic() < deadline and set(checkpoints.complete_tags(saved)) <= before:
            time.sleep(0.05)
        if kill % 2:  # in the middle of a save
            while job.poll() is None and time.monotonic() < deadline and not any(saved.glob(f"*{PARTIAL}")):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, IN_SAVE_WINDOW_S))
        else:
            time.sleep(rng.uniform(0, KILL_WINDOW_S))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        for buffer in shared_memory_buffers(port):
            buffer.unlink()  # nothing of a SIGKILLed rank removes it
        left_a_partial += any(saved.glob(f"*{PARTIAL}"))
        latest = checkpoints.latest_tag(saved)
        try:
            if latest is not None:
                checkpoints.check_complete(saved, latest)
            consistent += 1
        except FuyouIOError:
            pass
    resume = ["--resume"] if checkpoints.latest_tag(saved) is not None else []
    (workdir / "metrics.json").unlink(missing_ok=True)
    last = finished_run(workdir, "--steps", str(KILL_STEPS), *saves, *resume)
    return {"left_a_partial": left_a_partial, "consistent": consistent, "last": last}


def resumed_as_uninterrupted(losses: list[float], reference: list[float]) -> tuple[bool, float]:
    """Whether resumed `losses` equal the uninterrupted `reference` bit for bit, and the largest relative difference."""
    differences = [abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True)]
    return losses == reference, max(differences, default=0.0)


def corruption_rows(args: argparse.Namespace, scratch: Path, rng: random.Random) -> tuple[list[list[str]], bool]:
    reference_dir, soak_dir = scratch / "reference", scratch / "soak"
    prepare(reference_dir)
    prepare(soak_dir)
    start = time.perf_counter()
    reference = finished_run(reference_dir, "--steps", str(args.steps), "--no-final-save")
    reference_s = time.perf_counter() - start
    corrupted = corrupted_run(soak_dir, args, rng)
    resumed = finished_run(soak_dir, "--steps", str(args.steps), "--resume", "--no-final-save")
    first = resumed["first_step"]
    continues, largest = resumed_as_uninterrupted(resumed["losses"], reference["losses"][first:])
    passed = (
        corrupted["exit_status"] != 0
        and corrupted["checksum_error"]
        and not corrupted["saved_after_corruption"]
        and continues
    )
    rss = reference["peak_rss_bytes"] / 2**30
    rows = [
        ["reference run", f"{args.steps} steps in {reference_s:.0f} s, peak RSS {rss:.2f} GiB"],
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
            f"from step {first}, {args.steps - first} steps, equal to the uninterrupted run's: {continues} "
            f"(largest relative difference {largest:g})",
        ],
        ["corruption soak", "pass" if passed else "FAIL"],
    ]
    return rows, passed


def kill_rows(args: argparse.Namespace, scratch: Path, rng: random.Random) -> tuple[list[list[str]], bool]:
    reference_dir, kill_dir = scratch / "kill-reference", scratch / "kills"
    prepare(reference_dir)
    prepare(kill_dir)
    reference = finished_run(reference_dir, "--steps", str(KILL_STEPS), "--no-final-save")
    killed = killed_runs(kill_dir, args, rng)
    last = killed["last"]
    continues, largest = resumed_as_uninterrupted(last["losses"], reference["losses"][last["first_step"] :])
    passed = killed["consistent"] == args.kills and continues
    rows = [
        [
            "kills",
            f"{args.kills} (SIGKILL: half up to {KILL_WINDOW_S:g} s after the restart's first checkpoint, half up to "
            f"{IN_SAVE_WINDOW_S:g} s into a save), "
            f"{killed['left_a_partial']} left a save half-written",
        ],
        [
            "after each kill",
            f"latest named a complete checkpoint (or none) {killed['consistent']} of {args.kills} times",
        ],
        [
            "the last run",
            f"from step {last['first_step']} to {KILL_STEPS}, equal to the uninterrupted run's: {continues} "
            f"(largest relative difference {largest:g})",
        ],
        ["kill soak", "pass" if passed else "FAIL"],
    ]
    return rows, passed


def main() -> None:
    args = parse_args()
    if args.steps and args.steps < 3 * args.every:
        raise SystemExit("--steps must leave room for a corruption after a checkpoint (>= 3 x --every)")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    rows: list[list[str]] = []
    passed = True
    with tempfile.TemporaryDirectory(prefix="fuyou-soak-", dir=args.path) as scratch:
        for wanted, phase in ((args.steps, corruption_rows), (args.kills, kill_rows)):
            if wanted:
                phase_rows, phase_passed = phase(args, Path(scratch), rng)
                rows += phase_rows
                passed &= phase_passed
    settings = f"seed {seed}; corruption: {args.steps} steps, a checkpoint every {args.every}; kills: {args.kills}"
    body = f"{settings}\n\n```\n{table(['what', 'result'], rows)}\n```"
    print(body)
    if not args.no_record:
        append_result("bench_soak: corruption and kills mid-run, and the recovery", [str(args.path)], body)
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
