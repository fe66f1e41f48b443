"""Blur-pooled downsampling: BlurPool2d, MaxBlurPool2d, BlurPool1d.

Reads geometry -> reference -> kernels (triton.py, csrc/blurpool) -> op -> modules.
"""

from .modules import BlurPool1d, BlurPool2d, MaxBlurPool2d, blur_pool1d, blur_pool2d, max_blur_pool2d

__all__ = ["BlurPool1d", "BlurPool2d", "MaxBlurPool2d", "blur_pool1d", "blur_pool2d", "max_blur_pool2d"]
