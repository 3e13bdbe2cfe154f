"""The dtype matmuls run in: the one rule shared by the MoE, the chunked loss and RoPE."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is active on x's device, else x's own dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
