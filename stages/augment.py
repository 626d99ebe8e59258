"""Stage 3: originals plus seeded augmented copies (more for the minority class) into one HDF5, and a sheet of
examples (metrics/augment/augment_examples.png)."""

from glomeruli.core.atomic import atomic_path
from glomeruli.data.augment import augment_store, write_examples
from glomeruli.core.paths import AUGMENT_EXAMPLES, AUGMENTED, PREPROCESSED
from glomeruli.core.stagekit import run_stage


def main(params):
    with atomic_path(AUGMENTED) as tmp:
        augment_store(PREPROCESSED, tmp, params.augment, seed=params.seed, workers=params.runtime.workers)
    with atomic_path(AUGMENT_EXAMPLES) as tmp:
        write_examples(PREPROCESSED, tmp, params.augment, seed=params.seed)


if __name__ == "__main__":
    run_stage("augment", main)
