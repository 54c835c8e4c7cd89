"""Weights: folder discovery and validation, streaming safetensors loading, and ``make-tiny``."""
