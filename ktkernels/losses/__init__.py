"""Transfer losses: KTFT pixel/global, DCT attention, attention transfer, soft targets, mentee probes."""

from .modules import (
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

__all__ = [
    "AttentionTransferLoss",
    "DCTAttentionLoss",
    "LossOutput",
    "PixelGlobalTransferLoss",
    "SoftTargetLoss",
    "attention_transfer_loss",
    "dct_attention_loss",
    "mentee_rmse_loss",
    "pixel_global_transfer_loss",
    "soft_target_loss",
    "teacher_correct_mask",
]
