"""Stage 8: the trained model as ONNX with its contract (models/export/model.onnx), for predict without TensorFlow."""

from glomeruli.core.stagekit import run_stage


def main(params):
    # Keras loads here, inside run_stage, so a bad KERAS_BACKEND is one clear line (glomeruli.model.backend checks it).
    from glomeruli.model.backend import configure
    from glomeruli.model.export import export_onnx
    from glomeruli.core.paths import EXPORT_ONNX, MODEL

    configure(params.seed, "float32", params.runtime.deterministic)  # the export computes in float32 (export.py)
    export_onnx(MODEL, EXPORT_ONNX, opset=params.export.opset)


if __name__ == "__main__":
    run_stage("export", main)
