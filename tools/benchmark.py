"""Benchmarks.

    python tools/benchmark.py scan        # selective-scan backends side by side: batch 2, E=768, N=16, L=256
    python tools/benchmark.py scan --backends torch mamba_ssm --batch 8 --channels 2048 --length 1024 --device cuda
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssm_tread.ops import BACKENDS  # noqa: E402
from ssm_tread.ops.bench import benchmark_scan, scan_table  # noqa: E402


def scan(args):
    times = benchmark_scan(
        args.batch, args.channels, args.state, args.length, args.backends, args.device, args.warmup, args.repeats
    )
    shape = f"batch {args.batch}, E={args.channels}, N={args.state}, L={args.length}"
    print(f"selective scan, forward + backward, {shape}, {args.device}, median of {args.repeats}\n")
    print(scan_table(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scan", help="time the selective-scan backends side by side (forward + backward)")
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--channels", type=int, default=768, help="E, the mixer's inner width")
    s.add_argument("--state", type=int, default=16, help="N")
    s.add_argument("--length", type=int, default=256, help="L")
    s.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: every backend usable on the device")
    s.add_argument("--device", default="cpu")
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--repeats", type=int, default=5)
    s.set_defaults(run=scan)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
