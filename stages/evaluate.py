"""Stage 7: pick the threshold on validation, report every metric on test, write plots and model metadata."""

from glomeruli.stagekit import run_stage


def main(params):
    # Keras loads here, inside run_stage, so a bad KERAS_BACKEND is one clear line (glomeruli.backend checks it).
    from glomeruli.backend import configure, request_xla_determinism
    from glomeruli.distribute import start as start_devices
    from glomeruli.evaluation import evaluate_model
    from glomeruli.metadata import DatasetLayout
    from glomeruli.paths import AUGMENTED, LIVE_FINETUNE, LIVE_FROZEN, METRICS, MODEL, PLOTS, SPLIT

    request_xla_determinism(params.runtime.deterministic)  # before anything starts JAX's backend
    engine = start_devices(params.runtime.devices)  # first: on several hosts it joins the JAX job
    configure(params.seed, params.runtime.mixed_precision, params.runtime.deterministic)
    with engine.scope():  # TensorFlow loads and runs the model in its strategy
        evaluate_model(MODEL, AUGMENTED, SPLIT, params.evaluate, max_pixels=params.ingest.max_pixels,
                       dataset_layout=DatasetLayout(class_dirs=params.ingest.class_dirs,
                                                    labels_csv=params.ingest.labels_csv,
                                                    group_regex=params.ingest.group_regex),
                       metrics_path=METRICS, plots_dir=PLOTS, seed=params.seed,
                       curves={"frozen": LIVE_FROZEN, "fine-tune": LIVE_FINETUNE})


if __name__ == "__main__":
    run_stage("evaluate", main)
