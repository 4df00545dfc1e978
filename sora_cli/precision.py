"""The precision sums, merges and scores run in: float32, or float64 when the input is float64, so that a float64
run (the exact numerical checks) keeps every digit while half-precision weights are summed in float32."""

from __future__ import annotations

import torch


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in `wide_dtype` (no copy when it already is)."""
    return t.to(wide_dtype(t.dtype))
