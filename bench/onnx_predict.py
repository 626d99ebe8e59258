"""ONNX predict against Keras predict, side by side in one run, and the installed size of each environment.

    .venv/bin/python bench/onnx_predict.py [--images 128] [--passes 3] [--predict-venv /tmp/predict-venv]

A B3 at 300 px (weights none: speed does not depend on what the weights learnt) is saved with its metadata and
exported by the export stage's own function (glomeruli.model.export.export_onnx); synthetic PNGs (250-950 px, as
`glomeruli sample-data` writes them) are predicted by `glomeruli.commands.predict.predict_folder` with the .keras file and
with the .onnx file, alternating, best pass of each kept. Two rows: whole predict calls (model load, decoding in
worker processes, the forward passes), and the bare forward pass on the same decoded batches
(`model.predict_on_batch` vs `InferenceSession.run`). Environment sizes: `du` of each virtual environment
(--predict-venv: one made from requirements-predict.txt alone, `pip install --no-deps .` on top).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
SIZE, BATCH = 300, 32


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def du_mb(path: Path) -> float:
    """Installed size of a folder in MB (as `du -sb`, symlinks not followed)."""
    out = subprocess.run(["du", "-sb", str(path.resolve())], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--predict-venv", type=Path, default=Path("/tmp/predict-venv"))
    parser.add_argument("-o", "--output", type=Path, default=None, help="JSON of the results (default: print only)")
    args = parser.parse_args()

    import keras
    import numpy as np

    from glomeruli.model.export import export_onnx
    from glomeruli.data.images import load_model_input
    from glomeruli.model.metadata import CLASS_NAMES, ModelMetadata, file_sha256, write_metadata
    from glomeruli.model.efficientnet import build_model
    from glomeruli.model.onnxmodel import OnnxModel
    from glomeruli.commands.predict import list_images, predict_folder
    from glomeruli.data.sample_data import generate_sample_dataset

    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as scratch:
        scratch = Path(scratch)
        images = scratch / "images"
        generate_sample_dataset(scratch / "sample", args.images, seed=0, progress=False)
        images.mkdir()
        for png in sorted((scratch / "sample").rglob("*.png")):
            os.link(png, images / png.name)
        keras_path = scratch / "model.keras"
        build_model(SIZE, "none", 0.3).save(keras_path)
        write_metadata(keras_path, ModelMetadata(image_size=SIZE, fill=(0, 0, 0), threshold=0.5, threshold_rule="fixed",
                                                 class_names=CLASS_NAMES, model_sha256=file_sha256(keras_path),
                                                 max_pixels=10**8))
        onnx_path = scratch / "export" / "model.onnx"
        started = time.perf_counter()
        export_onnx(keras_path, onnx_path, opset=18)
        export_s = time.perf_counter() - started

        # whole predict calls, alternating
        whole: dict[str, list[float]] = {"keras": [], "onnx": []}
        probabilities = {}
        for _ in range(args.passes):
            for name, path in (("keras", keras_path), ("onnx", onnx_path)):
                started = time.perf_counter()
                predictions, _ = predict_folder(path, images, batch_size=BATCH, workers=0)
                whole[name].append(len(predictions) / (time.perf_counter() - started))
                probabilities[name] = np.array([p.probability for p in predictions])
        max_diff = float(np.max(np.abs(probabilities["keras"] - probabilities["onnx"])))

        # bare forward passes on the same decoded batches, after a first (tracing) batch, alternating
        files = list_images(images)
        x = np.stack([load_model_input(f.read_bytes(), f.name, SIZE, (0, 0, 0), 10**8) for f in files]).astype(np.float32)
        batches = [x[i:i + BATCH] for i in range(0, len(x) - BATCH + 1, BATCH)]
        model, session = keras.saving.load_model(keras_path, compile=False), OnnxModel(onnx_path)
        model.predict_on_batch(batches[0])
        session.predict_batch(batches[0], BATCH)
        bare: dict[str, list[float]] = {"keras": [], "onnx": []}
        for _ in range(args.passes):
            for name, run in (("keras", model.predict_on_batch), ("onnx", lambda b: session.predict_batch(b, BATCH))):
                started = time.perf_counter()
                for batch in batches:
                    run(batch)
                bare[name].append(len(batches) * BATCH / (time.perf_counter() - started))

    full_venv = ROOT / ".venv"
    result = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, load average "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "keras": f"{keras.__version__} on {keras.backend.backend()}",
        "images": len(files), "size": SIZE, "batch": BATCH, "passes": args.passes,
        "export_s": round(export_s, 1), "max_abs_probability_diff": max_diff,
        "predict_folder_img_s": {k: round(max(v), 2) for k, v in whole.items()},
        "forward_img_s": {k: round(max(v), 2) for k, v in bare.items()},
        "env_mb": {"full .venv": round(du_mb(full_venv), 1),
                   "predict venv": round(du_mb(args.predict_venv), 1) if args.predict_venv.is_dir() else None},
    }
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
