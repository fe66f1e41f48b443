"""Drop-in layers for every blur-pool user, plus one-call model conversion and anti-aliasing surgery.

- ``ktkernels.compat.antialiased_cnns``, ``.kornia``, ``.timm``, ``.composer``, ``.ffcv``: each anchor's
  classes and functions with its signature, defaults, output geometry, attribute names and state-dict
  keys, running on the ktkernels ops.
- :func:`convert` swaps third-party blur layers in a model for these, in place.
- :func:`antialias` turns a plain pre-trained network into an anti-aliased one.
"""

from . import antialiased_cnns, composer, ffcv, kornia, timm
from .antialias import SUPPORTED, antialias
from .convert import ConversionReport, convert

__all__ = [
    "SUPPORTED",
    "ConversionReport",
    "antialias",
    "antialiased_cnns",
    "composer",
    "convert",
    "ffcv",
    "kornia",
    "timm",
]
