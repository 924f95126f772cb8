"""KV-cache layout: model geometry (Full Blocks, Layer Blocks)."""

from .model import PRESETS, ModelSpec, get_model

__all__ = ["ModelSpec", "PRESETS", "get_model"]
