"""ktkernels: fused Triton, CUDA and C++ kernels for anti-aliased CNNs and knowledge-transferred fine-tuning.

>>> import torch, ktkernels
>>> ktkernels.BlurPool2d(3)(torch.randn(2, 3, 8, 8)).shape
torch.Size([2, 3, 4, 4])
"""

from . import backend, compat, losses, models, transfer
from .backend import get_backend, set_backend, use_backend
from .blurpool import BlurPool1d, BlurPool2d, MaxBlurPool2d, blur_pool1d, blur_pool2d, decomposed, max_blur_pool2d
from .compat import antialias, convert
from .dct import DCT2d, IDCT2d, dct, dct2d, dct_attention_map, idct, idct2d
from .export import export_onnx
from .losses import (
    AttentionTransferLoss,
    DCTAttentionLoss,
    LossOutput,
    PixelGlobalTransferLoss,
    SoftTargetLoss,
    attention_transfer_loss,
    dct_attention_loss,
    mentee_rmse_loss,
    pixel_global_transfer_loss,
    soft_target_loss,
    teacher_correct_mask,
)
from .transfer import AnnealedWeight

__version__ = "0.1.0"

__all__ = [
    "AnnealedWeight",
    "AttentionTransferLoss",
    "DCTAttentionLoss",
    "LossOutput",
    "PixelGlobalTransferLoss",
    "SoftTargetLoss",
    "attention_transfer_loss",
    "dct_attention_loss",
    "losses",
    "mentee_rmse_loss",
    "pixel_global_transfer_loss",
    "soft_target_loss",
    "teacher_correct_mask",
    "transfer",
    "DCT2d",
    "IDCT2d",
    "BlurPool1d",
    "BlurPool2d",
    "MaxBlurPool2d",
    "antialias",
    "backend",
    "blur_pool1d",
    "blur_pool2d",
    "compat",
    "convert",
    "dct",
    "dct2d",
    "dct_attention_map",
    "decomposed",
    "export_onnx",
    "get_backend",
    "idct",
    "idct2d",
    "max_blur_pool2d",
    "models",
    "set_backend",
    "use_backend",
]
