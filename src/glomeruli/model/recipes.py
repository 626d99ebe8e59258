"""Training recipes: named sets of params.yaml overrides the benchmark supports (bench/RESULTS.md).

`FROM_SCRATCH_OVERRIDES` is the offline recipe (no ImageNet weights), "Training recipes on the hard set" in
bench/RESULTS.md: the README's command and `glomeruli doctor`'s advice (`from_scratch_command`), the learning
test and the benchmark all take it from here.
"""

from __future__ import annotations

# EfficientNetB3 from random initialisation learns no structure from images this small: at 64 px its last blocks
# work on 2x2 maps and it memorises the training images (bench/RESULTS.md, training recipes); at 128 px it learns.
FROM_SCRATCH_MIN_IMAGE_SIZE = 128

# The offline recipe bench/RESULTS.md supports when ImageNet weights cannot be had (training recipes on the
# hard set): every layer, BatchNormalization included, trained from scratch at 128 px or more (at 64 px
# EfficientNetB3 memorises its training images). The README's command and the learning test use these values.
FROM_SCRATCH_OVERRIDES = {
    "preprocess.image_size": 128,
    "model.weights": "none",
    "train_frozen.epochs": 30,
    "train_frozen.lr": 0.003,
    "train_frozen.patience": 6,
    "finetune.unfreeze_blocks": "all",
    "finetune.lr": 0.001,
    "finetune.lr_schedule": "cosine",
    "finetune.warmup_epochs": 0,
    "finetune.epochs": 12,
    "finetune.patience": 12,
}


def from_scratch_command() -> str:
    """The `dvc exp run` line applying FROM_SCRATCH_OVERRIDES (the README and `glomeruli doctor` show it)."""
    return "dvc exp run " + " ".join(f"-S {key}={value}" for key, value in FROM_SCRATCH_OVERRIDES.items())
