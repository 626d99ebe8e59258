#!/usr/bin/env python
"""Epoch times of one from-scratch training on the hard set, for trying runtime knobs (bench/RESULTS.md, "The
suite, third round"). The set and the recipe are bench/recipes.py's (recipe c: the frozen phase, then every layer
from scratch at 128 px, batch 32); the knob comes from the environment or --no-graph-optimizer.

    .venv/bin/python bench/training_knobs.py --n-images 200 --frozen-epochs 5 --scratch-epochs 2
    # two at once, as the suite's two workers, with one TensorFlow thread each:
    for tag in one two; do TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \\
        .venv/bin/python bench/training_knobs.py --tag $tag & done; wait
    .venv/bin/python bench/training_knobs.py --scratch-epochs 6 --no-graph-optimizer
    KERAS_BACKEND=jax XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        .venv/bin/python bench/training_knobs.py --n-images 60 --frozen-epochs 2 --scratch-epochs 1

Prints one line per from-scratch epoch and a RESULT line (seconds: data, frozen phase, from-scratch phase, total).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import recipes  # bench/recipes.py: the hard set and recipe c, built with the package's own functions
from _common import log, machine

import keras  # noqa: E402

from glomeruli.model.backend import configure  # noqa: E402
from glomeruli.model.efficientnet import build_model  # noqa: E402
from glomeruli.model.training import finetune, load_phase_data, train_frozen  # noqa: E402
from glomeruli.data.h5store import ImageStore  # noqa: E402
from glomeruli.model.recipes import FROM_SCRATCH_OVERRIDES as SCRATCH  # noqa: E402


class EpochTimes(keras.callbacks.Callback):
    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        log(f"{self.tag} epoch {epoch}: {time.perf_counter() - self.start:.1f} s, val_loss {logs.get('val_loss'):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=200, help="hard-set images (one biopsy per 4, half sclerotic)")
    ap.add_argument("--frozen-epochs", type=int, default=5)
    ap.add_argument("--scratch-epochs", type=int, default=2)
    ap.add_argument("--no-graph-optimizer", action="store_true", help="TensorFlow's meta optimizer (Grappler) off")
    ap.add_argument("--tag", default="run", help="names this run's lines when several run at once")
    args = ap.parse_args()
    data_args = argparse.Namespace(n_images=args.n_images, n_biopsies=args.n_images // 4, seed=0,
                                   size=SCRATCH["preprocess.image_size"], sclerotic_fraction=0.5,
                                   scratch_epochs=args.scratch_epochs, scratch_lr=SCRATCH["finetune.lr"],
                                   scratch_batch=32)
    log(f"{args.tag}: {machine()}, keras {keras.__version__} on {keras.backend.backend()}, "
        f"TF threads {os.environ.get('TF_NUM_INTRAOP_THREADS', 'default')}, "
        f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}, graph optimizer {'off' if args.no_graph_optimizer else 'on'}")
    start = time.perf_counter()
    params = recipes.make_params(data_args)
    with tempfile.TemporaryDirectory(prefix="glomeruli-knobs-") as work:
        augmented, split = recipes.build_data(data_args, params, Path(work))
        data_done = time.perf_counter()
        configure(params.seed, "float32", "auto")
        if args.no_graph_optimizer:
            import tensorflow as tf

            tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
        model = build_model(data_args.size, "none", params.model.dropout)
        with ImageStore(augmented) as store:
            phase = load_phase_data(store, split, 2.0)
            train_frozen(model, phase, replace(params.train_frozen, epochs=args.frozen_epochs), params.runtime,
                         seed=params.seed, callbacks=[])
            frozen_done = time.perf_counter()
            finetune(model, phase, recipes.finetune_params(params, "c", data_args), params.runtime, seed=params.seed,
                     callbacks=[EpochTimes(args.tag)], from_scratch=True)
    end = time.perf_counter()
    log(f"RESULT {args.tag}: data {data_done - start:.1f} s, frozen {frozen_done - data_done:.1f} s, "
        f"from scratch {end - frozen_done:.1f} s, total {end - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
