"""Stage 3: originals plus seeded augmented copies (more for the minority class) into one HDF5."""

from glomeruli.atomic import atomic_path
from glomeruli.augment import augment_store
from glomeruli.paths import AUGMENTED, PREPROCESSED
from glomeruli.stagekit import run_stage


def main(params):
    with atomic_path(AUGMENTED) as tmp:
        augment_store(PREPROCESSED, tmp, params.augment, seed=params.seed, workers=params.runtime.workers)


if __name__ == "__main__":
    run_stage("augment", main)
