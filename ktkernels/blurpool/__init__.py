"""Blur-pooled downsampling: BlurPool2d, MaxBlurPool2d, BlurPool1d.

Reads geometry -> reference -> kernels (triton.py, csrc/blurpool) -> op -> modules.
"""

from .modules import (
    BlurLayer,
    BlurPool1d,
    BlurPool2d,
    MaxBlurPool2d,
    MaxThenBlur,
    blur_pool1d,
    blur_pool2d,
    decomposed,
    max_blur_pool2d,
)

__all__ = [
    "BlurLayer",
    "BlurPool1d",
    "BlurPool2d",
    "MaxBlurPool2d",
    "MaxThenBlur",
    "blur_pool1d",
    "blur_pool2d",
    "decomposed",
    "max_blur_pool2d",
]
