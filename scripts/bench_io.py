"""Sequential SSD throughput: ours vs DeepSpeed's aio_handle vs buffered Python vs fio, in one run.

Same options as `fuyou bench-io`; prints the table and appends it to benchmarks/RESULTS.md (pass --no-record to
only print). Example: python scripts/bench_io.py --path /mnt/nvme0 --path /mnt/nvme1 --size 4GiB
"""

from __future__ import annotations

import argparse
import json
import sys

from benchlib import append_result

from deepspeed_fuyou.cli import bench_io


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers()
    bench_io.add_parser(subparsers)
    argv = sys.argv[1:]
    record = "--no-record" not in argv
    args = parser.parse_args(["bench-io", *(a for a in argv if a != "--no-record")])
    report = bench_io.run(bench_io.settings_from_args(args))
    table = bench_io.format_table(report)
    print(json.dumps(report) if args.json else table)
    if record:
        append_result("fuyou bench-io", args.path, f"```\n{table}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
