"""The network and what runs it: EfficientNetB3 and its facts (`efficientnet`), the Keras backend
(`backend`, the only module that imports TensorFlow or JAX), devices and data parallelism (`distribute`),
the forward pass (`inference`), the input pipeline, checkpoints and the two training phases (`batches`,
`checkpoints`, `training`), the metadata that travels with a model (`metadata`) and the ONNX export and its
runtime (`export`, `onnxmodel`).

Imports: `glomeruli.core` and `glomeruli.data`.
"""
