"""Batched 2-D (and 1-D) DCT of activation maps, and the DCT attention map.

Reads basis -> reference -> kernels (triton.py, csrc/dct) -> op -> modules.
"""

from .modules import DCT2d, IDCT2d, dct, dct2d, dct_attention_map, idct, idct2d

__all__ = ["DCT2d", "IDCT2d", "dct", "dct2d", "dct_attention_map", "idct", "idct2d"]
