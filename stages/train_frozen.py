"""Stage 5: EfficientNetB3 base frozen, train the head (on cached base features by default)."""

from glomeruli.core.stagekit import run_stage


def main(params):
    # Keras loads here, inside run_stage, so a bad KERAS_BACKEND is one clear line (glomeruli.model.backend checks it).
    from glomeruli.core.paths import AUGMENTED, CHECKPOINTS, FROZEN_MODEL, LIVE_FROZEN, MANIFEST, SPLIT
    from glomeruli.model.backend import configure, request_xla_determinism
    from glomeruli.model.distribute import start as start_devices
    from glomeruli.model.efficientnet import build_model
    from glomeruli.model.training import PhasePaths, run_phase

    request_xla_determinism(params.runtime.deterministic)  # before anything starts JAX's backend
    start_devices(params.runtime.devices)  # first: on several hosts it joins the JAX job
    configure(params.seed, params.runtime.mixed_precision, params.runtime.deterministic)
    paths = PhasePaths(store=AUGMENTED, split=SPLIT, manifest=MANIFEST, checkpoints=CHECKPOINTS, model=FROZEN_MODEL,
                       live=LIVE_FROZEN)
    run_phase("train_frozen", params, lambda image_size: build_model(image_size, params.model.weights,
                                                                     params.model.dropout), paths)


if __name__ == "__main__":
    run_stage("train_frozen", main)
