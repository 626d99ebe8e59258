"""Stage 7: pick the threshold on validation, report every metric on test, write plots, model metadata and the
model card."""

from pathlib import Path

from glomeruli.core.stagekit import run_stage


def main(params):
    # Keras loads here, inside run_stage, so a bad KERAS_BACKEND is one clear line (glomeruli.model.backend checks it).
    from glomeruli.model.backend import configure, request_xla_determinism
    from glomeruli.model.distribute import start as start_devices
    from glomeruli.evaluation.evaluate import evaluate_model
    from glomeruli.model.metadata import DatasetLayout, read_metadata
    from glomeruli.evaluation.model_card import build_model_card, read_json_input, read_provenance, write_model_card
    from glomeruli.core.paths import (AUGMENTED, INGEST_REPORT, LIVE_FINETUNE, LIVE_FROZEN, MANIFEST, METRICS, MODEL,
                                 MODEL_CARD, PARAMS_FILE, PLOTS, SPLIT, SPLIT_SUMMARY)

    request_xla_determinism(params.runtime.deterministic)  # before anything starts JAX's backend
    engine = start_devices(params.runtime.devices)  # first: on several hosts it joins the JAX job
    configure(params.seed, params.runtime.mixed_precision, params.runtime.deterministic)
    with engine.scope():  # TensorFlow loads and runs the model in its strategy
        report = evaluate_model(MODEL, AUGMENTED, SPLIT, params.evaluate, max_pixels=params.ingest.max_pixels,
                                dataset_layout=DatasetLayout(class_dirs=params.ingest.class_dirs,
                                                             labels_csv=params.ingest.labels_csv,
                                                             group_regex=params.ingest.group_regex),
                                metrics_path=METRICS, plots_dir=PLOTS, seed=params.seed,
                                curves={"frozen": LIVE_FROZEN, "fine-tune": LIVE_FINETUNE})
    card = build_model_card(
        report, read_metadata(MODEL), params,
        read_json_input(INGEST_REPORT, "the ingest report", "rerun `dvc repro ingest`"),
        read_json_input(SPLIT_SUMMARY, "the split summary", "rerun `dvc repro split`"),
        read_provenance(Path.cwd(), MODEL, PARAMS_FILE, MANIFEST))
    write_model_card(MODEL_CARD, card)


if __name__ == "__main__":
    run_stage("evaluate", main)
