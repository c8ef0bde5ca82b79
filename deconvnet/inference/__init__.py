"""Inference: proposals, the segmenter (crop, forward, paste back, merge), the
dense CRF, and the modes that fix their settings (`modes`)."""

from .modes import INFERENCE_MODES, MODE_TABLE, InferenceConfig, for_mode

__all__ = ["INFERENCE_MODES", "MODE_TABLE", "InferenceConfig", "for_mode"]
