"""The evaluate stage and its parts: metrics and threshold rules (`metrics`), calibration
(`calibration`), biopsy-level intervals (`uncertainty`), per-biopsy burden (`burden`), per-site metrics
(`sites`), plots (`plots`), Grad-CAM and the error sheets (`gradcam`, `gallery`), the names of evaluate's
outputs (`outputs`) and the model card (`model_card`); `evaluate` runs them.

Imports: `glomeruli.core`, `glomeruli.data` and `glomeruli.model`.
"""
