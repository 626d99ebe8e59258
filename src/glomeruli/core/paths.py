"""Where each stage reads and writes, relative to the project root (the same paths as dvc.yaml).

Names only: a path that disagrees with dvc.yaml's `outs` fails the stage rather than changing an output, so
this module is one of `stage_deps.CANNOT_CHANGE_OUTPUTS`.
"""

from pathlib import Path

MANIFEST = Path("data/interim/manifest.csv")
INGEST_REPORT = Path("data/interim/ingest_report.json")
PREPROCESSED = Path("data/interim/preprocessed.h5")
AUGMENTED = Path("data/processed/augmented.h5")
AUGMENT_EXAMPLES = Path("metrics/augment/augment_examples.png")  # not under metrics/plots: evaluate owns that
SPLIT = Path("data/processed/split.json")
SPLIT_SUMMARY = Path("metrics/split.json")
FROZEN_MODEL = Path("models/frozen.keras")
MODEL = Path("models/model.keras")
LIVE_FROZEN = Path("metrics/train_frozen")
LIVE_FINETUNE = Path("metrics/finetune")
METRICS = Path("metrics/evaluate.json")
MODEL_CARD = Path("models/MODEL_CARD.md")  # git-tracked beside the model (cache: false), so review diffs it
PARAMS_FILE = Path("params.yaml")
PLOTS = Path("metrics/plots")
EXPORT_ONNX = Path("models/export/model.onnx")  # the model for predict without TensorFlow (onnxruntime)
CHECKPOINTS = Path(".glomeruli-tmp/checkpoints")  # resume state, outside DVC's outputs
