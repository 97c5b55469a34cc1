"""Train the 16x16 digits classifier used by DigitsEvaluator (deterministic, CPU, about a minute).

    python tools/train_digits_classifier.py            # writes ssm_tread/assets/digits_classifier.pt
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ssm_tread.eval.digits import DEFAULT_WEIGHTS, save_digits_classifier, train_digits_classifier  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_WEIGHTS)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.2, help="share of the 1,797 digits held out")
    args = p.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model, metrics = train_digits_classifier(epochs=args.epochs, holdout=args.holdout, seed=args.seed)
    save_digits_classifier(model, metrics, args.out)
    print(f"held-out accuracy {metrics['heldout_accuracy']:.4f} ({round(args.holdout * 1797)} digits), "
          f"train accuracy {metrics['train_accuracy']:.4f}; saved {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
