"""ADM evaluation suite (FID, sFID, Inception Score, precision, recall) of a sample batch against a reference.

    python tools/eval_fid.py samples.npz checkpoints/VIRTUAL_imagenet256_labeled.npz \
        --inception checkpoints/pt_inception-2015-12-05-6726825d.pth

samples.npz: uint8 [N, 256, 256, 3] under 'arr_0'. Writes the results as JSON (--out, default
SAMPLES.eval.json) and prints a one-line summary. The output path and the sample counts are checked
before any feature is computed.

The samples come first, the reference second: the reverse of ADM's `evaluator.py REF SAMPLES`. The
order is kept (scripts written for it stay right) and guarded: a reference batch stores mu/sigma, so one
given in the samples position is refused at once with a line that says to swap.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.cli import ArgumentParser, positive_int, run_tool  # noqa: E402
from ssm_tread.eval.adm import evaluate_npz, summary_line  # noqa: E402
from ssm_tread.eval.inception import DEFAULT_INCEPTION_PATH  # noqa: E402
from ssm_tread.files import check_output_path  # noqa: E402


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="sample batch .npz (arr_0: uint8 [N, H, W, 3])")
    p.add_argument("reference", help="ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--inception", default=DEFAULT_INCEPTION_PATH, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="results JSON (default: SAMPLES.eval.json)")
    args = p.parse_args()
    out = check_output_path(args.out or os.path.splitext(args.samples)[0] + ".eval.json", "--out")
    results = evaluate_npz(args.samples, args.reference, args.inception, args.batch_size, args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(summary_line(results))
    print(f"results: {out}")


if __name__ == "__main__":
    run_tool(main, expected=(FileNotFoundError, KeyError, ValueError))
