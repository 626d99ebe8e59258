"""The data stages and what they share: reading a folder or zip (`sources`), the dataset's layout
(`layout`), decoding and the one path from file bytes to model input (`images`), stain colour (`stain`),
and the stages ingest, preprocess, augment and split, the HDF5 store they write and read (`h5store`), and the
synthetic sample generator (`sample_data`, which no stage imports).

Imports: `glomeruli.core` only.
"""
