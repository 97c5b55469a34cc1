"""Train the classifier of a pixel data set used by DigitsEvaluator (deterministic, CPU).

    python tools/train_digits_classifier.py               # digits, 40 epochs (about a minute):
                                                          # writes ssm_tread/assets/digits_classifier.pt
    python tools/train_digits_classifier.py --data mnist  # MNIST, 6 epochs (about 3 minutes):
                                                          # writes ssm_tread/assets/mnist_classifier.pt
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ssm_tread.eval.digits import PIXEL_DATASETS, save_digits_classifier, train_digits_classifier  # noqa: E402

EPOCHS = {"digits": 40, "mnist": 6}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=list(PIXEL_DATASETS), default="digits")
    p.add_argument("--out", default=None, help="weights file (default: the data set's bundled asset)")
    p.add_argument("--epochs", type=int, default=None, help="default: 40 (digits), 6 (MNIST)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of the 1,797 digits held out (MNIST holds out its fixed 1,000 test images)")
    args = p.parse_args()
    out = args.out or PIXEL_DATASETS[args.data][0]
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model, metrics = train_digits_classifier(args.data, epochs=args.epochs or EPOCHS[args.data],
                                             holdout=args.holdout, seed=args.seed)
    save_digits_classifier(model, metrics, out)
    print(f"held-out accuracy {metrics['heldout_accuracy']:.4f} ({metrics['heldout_images']} {args.data} images), "
          f"train accuracy {metrics['train_accuracy']:.4f}; saved {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
