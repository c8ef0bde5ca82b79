"""DeconvNet (Noh et al., ICCV 2015): the model, its inference and training.

The dense CRF is public at the package top:

    from deconvnet import crf_config, dense_crf
    labels, confidence = dense_crf(image, probs, crf_config("paper", exact=True))

Both are `deconvnet.inference.crf`'s, imported on first use, so importing a
light module (`deconvnet.storage`, ...) does not load pydensecrf.
"""

from __future__ import annotations

from typing import Any

__all__ = ["crf_config", "dense_crf"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .inference import crf
        return getattr(crf, name)
    raise AttributeError(f"module 'deconvnet' has no attribute {name!r}")
