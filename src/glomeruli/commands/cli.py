"""`glomeruli` command: predict, recalibrate, review, cross-validation summary, demo, switch to real data, doctor,
sample data."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from glomeruli.core.errors import UserError
from glomeruli.core.logs import quiet_startup, setup_logging

log = logging.getLogger("glomeruli")


def _predict(args: argparse.Namespace) -> int:
    from glomeruli.core.atomic import check_file_output
    from glomeruli.model.metadata import metadata_path
    from glomeruli.model.onnxmodel import is_onnx
    from glomeruli.commands.predict import (dataset_layout, folder_labels, format_score, model_metadata, predict_folder,
                                   score_paths, score_predictions, write_predictions, write_score)

    # Only the model and its metadata: params.yaml describes training, and need not exist (or be valid) here.
    folder, model, output = Path(args.image_dir), Path(args.model), Path(args.output)
    meta_path = Path(args.meta) if args.meta else None
    onnx = is_onnx(model)  # an ONNX export runs on onnxruntime: TensorFlow, JAX and Keras are never imported
    if onnx and args.devices != "auto":
        raise UserError(f"--devices {args.devices}: {model} runs on onnxruntime's CPU provider; --devices chooses "
                        "accelerators for a Keras model (--model models/model.keras)")
    if not onnx:
        import glomeruli.model.backend  # noqa: F401  (first: a bad KERAS_BACKEND is one clear line, not a Keras traceback)
    for path in (output, *score_paths(output), *([Path(args.by_biopsy)] if args.by_biopsy else [])):
        check_file_output(path)  # a folder at an output's path is refused before the work, not after it
    meta = model_metadata(model, meta_path)  # --meta: refused when written for another model file (its checksum)
    # where the metadata came from, for messages: --meta, the ONNX file's own contract, or model.meta.json
    meta_source = meta_path or (model if onnx else metadata_path(model))
    if meta.recalibration is not None:
        log.info("metadata %s: temperature %.3f and threshold %.4f recalibrated on %s (%s)",
                 meta_source, meta.temperature, meta.threshold,
                 meta.recalibration.get("folder"), meta.recalibration.get("date"))
    layout = dataset_layout(model, meta, meta_source)
    labels = folder_labels(folder, layout)  # None unless in the training layout
    scored = labels is not None and labels.scorable and not args.no_score
    if scored:
        _check_scoring_libraries(folder)  # before the work, not after it
    threshold = meta.threshold if args.threshold is None else args.threshold
    ignore = frozenset({labels.csv_name} if labels and labels.csv_name else ())
    if onnx:
        predictions, skipped = predict_folder(model, folder, batch_size=args.batch_size, workers=args.workers,
                                              threshold=threshold, recursive=args.recursive, ignore=ignore, meta=meta)
    else:
        from glomeruli.model.distribute import start

        with start(args.devices).scope():  # TensorFlow loads and runs the model in its strategy
            predictions, skipped = predict_folder(model, folder, batch_size=args.batch_size, workers=args.workers,
                                                  threshold=threshold, recursive=args.recursive, ignore=ignore,
                                                  meta=meta)
    write_predictions(output, predictions)
    n_pos = sum(p.label for p in predictions)
    log.info("wrote %s: %d images, %d predicted globally sclerotic, %d skipped", output, len(predictions),
             n_pos, len(skipped))
    if args.by_biopsy:
        from glomeruli.evaluation.burden import write_burden_csv
        from glomeruli.commands.predict import burden_by_biopsy

        rows = burden_by_biopsy(predictions, args.group_regex or layout.group_regex, labels)
        write_burden_csv(Path(args.by_biopsy), rows)
        log.info("wrote %s: %d biopsies", args.by_biopsy, len(rows))
    if scored:  # a labelled batch: score the model on it, as evaluate does
        score = score_predictions(predictions, labels, threshold)
        print(format_score(score.report))
        log.info("wrote %s and %s", *write_score(output, score))
    return 0


def _check_scoring_libraries(folder: Path) -> None:
    """Scoring a labelled folder needs scikit-learn and matplotlib, which the prediction-only environment
    (requirements-predict.txt) leaves out; refused in one line before anything is predicted."""
    import importlib

    missing = []
    for module, package in (("sklearn.metrics", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            importlib.import_module(module)  # imported, not only found: scoring imports them anyway
        except ImportError:
            missing.append(package)
    if missing:
        raise UserError(f"{folder} is labelled (training layout), so predict scores itself, which needs "
                        f"{' and '.join(missing)} (not installed): pip install -r requirements-predict-score.txt, or "
                        "pass --no-score to write the predictions alone")


def _recalibrate(args: argparse.Namespace) -> int:
    import glomeruli.model.backend  # noqa: F401  (first: a bad KERAS_BACKEND is one clear line, not a Keras traceback)
    from glomeruli.model.distribute import start
    from glomeruli.commands.recalibrate import format_recalibration, recalibrate_folder

    model, output = Path(args.model), Path(args.output) if args.output else None
    with start(args.devices).scope():  # TensorFlow loads and runs the model in its strategy
        result, output = recalibrate_folder(model, Path(args.image_dir), output=output,
                                            threshold_rule=args.threshold_rule,
                                            threshold_resamples=args.threshold_resamples,
                                            bootstrap_resamples=args.bootstrap_resamples, seed=args.seed,
                                            batch_size=args.batch_size, workers=args.workers)
    print(format_recalibration(result))
    log.info("wrote %s (temperature %.3f -> %.3f, threshold %.4f -> %.4f); the model's own metadata is unchanged. "
             "Predict with it: glomeruli predict IMAGE_DIR --model %s --meta %s", output, result.old_temperature,
             result.temperature, result.old_threshold, result.threshold, model, output)
    return 0


def _cv_summary(args: argparse.Namespace) -> int:
    from glomeruli.core.atomic import write_json
    from glomeruli.commands.crossval import experiment_runs, folder_run, format_summary, summarize

    runs = ([folder_run(Path(f)) for f in args.folders] if args.folders
            else experiment_runs(Path(args.repo), args.exp))
    summary = summarize(runs)
    print(format_summary(summary))
    write_json(Path(args.output), summary)
    log.info("wrote %s", args.output)
    return 0


def _sample_data(args: argparse.Namespace) -> int:
    from glomeruli.data.sample_data import generate_sample_dataset

    lo, hi = args.size_range
    summary = generate_sample_dataset(Path(args.out_dir), args.n_images, difficulty=args.difficulty, seed=args.seed,
                                      size_range=(lo, hi), sclerotic_fraction=args.sclerotic_fraction,
                                      workers=args.workers, structure_only=args.structure_only, n_sites=args.sites)
    log.info("wrote %d synthetic images (%d sclerotic, %d biopsies%s) to %s", summary.n_images, summary.n_sclerotic,
             summary.n_biopsies, f", {summary.n_sites} sites" if summary.n_sites > 1 else "", summary.root)
    return 0


def _devices(value: str) -> str | int:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected auto or a count >= 1")
    return int(value)


def _review(args: argparse.Namespace) -> int:
    from glomeruli.commands.review import write_review

    out_dir = Path(args.output_dir)
    review = write_review(Path.cwd(), args.base, args.head, out_dir)
    log.info("wrote %s (%d pictures): %s -> %s", out_dir / "report.md", len(review.pictures), review.base.label,
             review.head.label)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from glomeruli.commands.workspace import CPU_OVERRIDES, DemoSettings, run_demo

    overrides = dict(CPU_OVERRIDES)
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = value
    run_demo(DemoSettings(n_images=args.n_images, seed=args.seed, difficulty=args.difficulty, n_sites=args.sites,
                          overrides=tuple(overrides.items())))
    return 0


def _use_data(args: argparse.Namespace) -> int:
    from glomeruli.commands.workspace import use_data

    for line in use_data(Path(args.source)):
        log.info("%s", line)
    log.info("ready: `glomeruli doctor` shows what the run will use; then `dvc repro`")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from glomeruli.commands.doctor import diagnose, format_findings

    findings = diagnose(Path(args.params))
    print(format_findings(findings))
    return 1 if any(f.problem for f in findings) and args.strict else 0


def _add_model_options(parser: argparse.ArgumentParser, *, model_help: str) -> None:
    """--model, --batch-size, --workers and --devices: how predict and recalibrate load and run the model."""
    parser.add_argument("--model", default="models/model.keras", help=model_help)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    parser.add_argument("--devices", type=_devices, default="auto",
                        help="accelerators the model runs on: auto (all local ones) or a count (see runtime.devices)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glomeruli", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything TensorFlow, JAX and other libraries log (also GLOMERULI_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="classify every image of a folder; writes name,ground truth,probability")
    p.add_argument("image_dir", help="folder of images (non-images and corrupt files are skipped and reported); in the "
                   "training layout (class folders, and public.csv, named as the model's metadata records) the "
                   "predictions are also scored against the labels ingest would give them")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="also predict the images in subfolders (named by their path inside image_dir)")
    _add_model_options(p, model_help="trained model: a .keras file (its .meta.json must sit beside it), or its ONNX "
                       "export (models/export/model.onnx, which carries its own metadata; runs on onnxruntime alone)")
    p.add_argument("--meta", metavar="META.json", default=None,
                   help="metadata to predict with instead of the model's own (models/model.meta.json), e.g. one "
                        "written by `glomeruli recalibrate`; refused when written for another model file")
    p.add_argument("-o", "--output", default="evaluation.csv",
                   help="CSV to write (default: evaluation.csv); a score goes beside it (evaluation.metrics.json, "
                        "evaluation.confusion_matrix.png)")
    p.add_argument("--threshold", type=float, default=None,
                   help="override the threshold chosen on validation (not recommended)")
    p.add_argument("--no-score", action="store_true",
                   help="do not score a labelled folder (no metrics JSON or confusion matrix; the environment of "
                        "requirements-predict.txt alone, without scikit-learn and matplotlib, needs it for one)")
    p.add_argument("--by-biopsy", metavar="SUMMARY.csv", default=None,
                   help="also write the per-biopsy summary (glomeruli, predicted %% globally sclerotic by count and by "
                        "mean probability; the true %% for a labelled folder), biopsy ids read from the file names")
    p.add_argument("--group-regex", default=None,
                   help="regex with a named group `group` finding the biopsy id in file names (default: "
                        "ingest.group_regex the model was trained with, from its metadata)")
    p.set_defaults(func=_predict)
    q = sub.add_parser("recalibrate", help="refit the temperature and threshold on a site's own labelled biopsies; "
                       "writes new metadata beside the model (its own is kept) for `predict --meta`")
    q.add_argument("image_dir", help="labelled folder in the model's training layout (class folders, and/or the "
                   "labels file, as its metadata records them); biopsy ids from the file names (ingest.group_regex)")
    _add_model_options(q, model_help="trained model (its .meta.json must sit beside it)")
    q.add_argument("-o", "--output", metavar="NEW_META.json", default=None,
                   help="metadata to write (default: beside the model, named by the folder: "
                        "models/model.recalibrated-FOLDER.meta.json); never the model's own")
    q.add_argument("--threshold-rule", choices=("max_f1", "youden", "fixed"), default=None,
                   help="how the threshold is chosen (default: the rule in the model's metadata, "
                        "evaluate.threshold_rule; fixed keeps its threshold)")
    q.add_argument("--threshold-resamples", type=int, default=0, metavar="N",
                   help="> 0: the median threshold over N resamples of the folder's biopsies "
                        "(evaluate.threshold_resamples)")
    q.add_argument("--bootstrap-resamples", type=int, default=1000, metavar="N",
                   help="resamples of whole biopsies for the 95 %% intervals (0 = none)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_recalibrate)
    c = sub.add_parser("cv-summary", help="mean ± sd over the K cross-validation folds and the pooled out-of-fold "
                       "metrics, from the fold runs' DVC experiments (or run folders)")
    c.add_argument("folders", nargs="*", help="project folders of the fold runs (default: the DVC experiments of "
                   "--repo on top of its current commit)")
    c.add_argument("--exp", nargs="+", metavar="NAME", default=None,
                   help="the experiments to use (default: every finished one; exactly one per fold)")
    c.add_argument("--repo", default=".", help="the DVC project whose experiments to read (default: here)")
    c.add_argument("-o", "--output", default="cv_summary.json", help="JSON to write (default: cv_summary.json)")
    c.set_defaults(func=_cv_summary)
    s = sub.add_parser("sample-data", help="write a synthetic dataset in the CMIL layout (for demos and tests)")
    s.add_argument("out_dir", nargs="?", default="data/sample",
                   help="default data/sample: data/raw is kept for your own images")
    s.add_argument("-n", "--n-images", type=int, default=300)
    s.add_argument("--difficulty", type=float, default=0.3, help="0 = trivially separable, 1 = hard")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size-range", type=int, nargs=2, default=(250, 950), metavar=("MIN", "MAX"))
    s.add_argument("--sclerotic-fraction", type=float, default=0.18)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--structure-only", action="store_true",
                   help="the hard set: stain, brightness, nucleus count and size drawn from one distribution for both "
                        "classes (same colour histogram), so only the tuft's structure separates them (open lumens "
                        "and capillary loops vs a wrinkled scar filling Bowman's space); a head on a random frozen "
                        "base fails on it, use it to compare training recipes")
    s.add_argument("--sites", type=int, default=1, metavar="N",
                   help="spread the biopsies over N sites (hospitals), each with its own stain vectors and intensity, "
                        "blur, background and share of sclerotic glomeruli (evenly spaced on the log-odds scale, "
                        "+-1.4 around the overall fraction: 18%% over 3 sites gives about 3.5, 13 and 38%%; the class "
                        "stays a matter of structure). Needs 4 images per site. Names become "
                        "SYNTH-SITE<k>_B<b>_PAS_...: read the site with ingest.site_regex "
                        "'^SYNTH-(?P<site>SITE\\d+)_'. Default 1: one site, as before")
    s.set_defaults(func=_sample_data)
    r = sub.add_parser("review", help="pull-request report of two revisions: metrics, params, stages rerun, pictures")
    r.add_argument("base", help="the revision to compare with (e.g. origin/main)")
    r.add_argument("head", nargs="?", default=None, help="the revision under review (default: the workspace)")
    r.add_argument("-o", "--output-dir", default="review", help="folder for report.md, comment.md and the PNGs")
    r.set_defaults(func=_review)
    d = sub.add_parser("demo", help="the CPU demo: synthetic images in data/sample through every stage")
    d.add_argument("-n", "--n-images", type=int, default=400)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--difficulty", type=float, default=0.3)
    d.add_argument("--sites", type=int, default=3, help="synthetic hospitals in the sample (1: one site, no by-site "
                   "results)")
    d.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                   help="another override for the demo's `dvc exp run` (e.g. -S preprocess.image_size=64)")
    d.set_defaults(func=_demo)
    u = sub.add_parser("use-data", help="leave the demo for your own images: restore the committed params and "
                       "lock, remove the demo's outputs and sample data, set data.source")
    u.add_argument("source", nargs="?", default="data/raw", help="your images: a folder in the CMIL layout or a .zip")
    u.set_defaults(func=_use_data)
    g = sub.add_parser("doctor", help="print the backend, devices, dtype policy, weights and data a run will use")
    g.add_argument("--params", default="params.yaml")
    g.add_argument("--strict", action="store_true", help="exit 1 when a problem is found")
    g.set_defaults(func=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_startup(args.verbose)  # before any command imports TensorFlow or JAX
    setup_logging()
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
