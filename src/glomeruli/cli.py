"""`glomeruli` command: predict on a folder of images, make synthetic sample data."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from glomeruli.errors import UserError
from glomeruli.logs import setup_logging

log = logging.getLogger("glomeruli")


def _predict(args: argparse.Namespace) -> int:
    import glomeruli.backend  # noqa: F401  (first: a bad KERAS_BACKEND is one clear line, not a Keras traceback)
    from glomeruli.predict import predict_folder, write_predictions

    predictions, skipped = predict_folder(Path(args.model), Path(args.image_dir), batch_size=args.batch_size,
                                          workers=args.workers, threshold=args.threshold)
    write_predictions(Path(args.output), predictions)
    n_pos = sum(p.label for p in predictions)
    log.info("wrote %s: %d images, %d predicted globally sclerotic, %d skipped", args.output, len(predictions),
             n_pos, len(skipped))
    return 0


def _sample_data(args: argparse.Namespace) -> int:
    from glomeruli.sample_data import generate_sample_dataset

    lo, hi = args.size_range
    summary = generate_sample_dataset(Path(args.out_dir), args.n_images, difficulty=args.difficulty, seed=args.seed,
                                      size_range=(lo, hi), sclerotic_fraction=args.sclerotic_fraction,
                                      workers=args.workers)
    log.info("wrote %d synthetic images (%d sclerotic, %d biopsies) to %s", summary.n_images, summary.n_sclerotic,
             summary.n_biopsies, summary.root)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glomeruli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="classify every image of a folder; writes name,ground truth,probability")
    p.add_argument("image_dir", help="folder of images (non-images and corrupt files are skipped and reported)")
    p.add_argument("--model", default="models/model.keras", help="trained model (its .meta.json must sit beside it)")
    p.add_argument("-o", "--output", default="evaluation.csv", help="CSV to write (default: evaluation.csv)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    p.add_argument("--threshold", type=float, default=None,
                   help="override the threshold chosen on validation (not recommended)")
    p.set_defaults(func=_predict)
    s = sub.add_parser("sample-data", help="write a synthetic dataset in the CMIL layout (for demos and tests)")
    s.add_argument("out_dir", nargs="?", default="data/raw")
    s.add_argument("-n", "--n-images", type=int, default=300)
    s.add_argument("--difficulty", type=float, default=0.3, help="0 = trivially separable, 1 = hard")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size-range", type=int, nargs=2, default=(250, 950), metavar=("MIN", "MAX"))
    s.add_argument("--sclerotic-fraction", type=float, default=0.18)
    s.add_argument("--workers", type=int, default=0)
    s.set_defaults(func=_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
