"""Stage 2: decode, fit into image_size x image_size with aspect ratio kept, normalise stain (optional), pad, store
as uint8 HDF5."""

from pathlib import Path

from glomeruli.core.atomic import atomic_path
from glomeruli.data.ingest import read_manifest
from glomeruli.core.paths import MANIFEST, PREPROCESSED
from glomeruli.data.preprocess import preprocess_images
from glomeruli.core.stagekit import run_stage
from glomeruli.data.stain import stain_normalization


def main(params):
    with atomic_path(PREPROCESSED) as tmp:
        preprocess_images(Path(params.data.source), read_manifest(MANIFEST), tmp,
                          size=params.preprocess.image_size, fill=params.preprocess.fill,
                          max_pixels=params.ingest.max_pixels, workers=params.runtime.workers,
                          stain=stain_normalization(params.preprocess.stain_normalization))


if __name__ == "__main__":
    run_stage("preprocess", main)
