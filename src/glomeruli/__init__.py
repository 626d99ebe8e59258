"""Glomeruli classification pipeline: DVC stages over small, testable modules."""

__version__ = "0.1.0"
