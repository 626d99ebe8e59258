"""Stage 6: unfreeze the top blocks of the frozen-phase model and train at a lower learning rate
(`finetune.epochs: 0`: no fine-tuning, the frozen-phase model is the model)."""

from glomeruli.core.stagekit import run_stage


def main(params):
    # Keras loads here, inside run_stage, so a bad KERAS_BACKEND is one clear line (glomeruli.model.backend checks it).
    from glomeruli.core.paths import AUGMENTED, CHECKPOINTS, FROZEN_MODEL, LIVE_FINETUNE, MANIFEST, MODEL, SPLIT
    from glomeruli.model.backend import configure, request_xla_determinism
    from glomeruli.model.distribute import start as start_devices
    from glomeruli.model.efficientnet import load_model
    from glomeruli.model.training import PhasePaths, run_phase

    request_xla_determinism(params.runtime.deterministic)  # before anything starts JAX's backend
    start_devices(params.runtime.devices)  # first: on several hosts it joins the JAX job
    configure(params.seed, params.runtime.mixed_precision, params.runtime.deterministic)
    paths = PhasePaths(store=AUGMENTED, split=SPLIT, manifest=MANIFEST, checkpoints=CHECKPOINTS, model=MODEL,
                       live=LIVE_FINETUNE, start_model=FROZEN_MODEL)
    run_phase("finetune", params, lambda image_size: load_model(FROZEN_MODEL), paths)


if __name__ == "__main__":
    run_stage("finetune", main)
