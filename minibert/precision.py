"""Numerics of a run: which precision a device computes in, and the autocast context for it.

    precision = resolve_precision("auto", device)      # "bf16" on CPUs and Ampere+, else "fp16"
    with autocast(device, precision):
        loss = model(inputs, labels=labels)

Training and evaluation both run the model under `autocast`; weights and optimizer state stay
fp32 whatever the precision.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import MinibertError


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CPUs and on GPUs that compute in bf16 natively (compute capability
    8.0, Ampere, or newer), fp16 (with loss scaling) on older GPUs such as the T4 (7.5)."""
    native_bf16 = device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8
    if precision == "auto":
        return "bf16" if native_bf16 else "fp16"
    if precision == "bf16" and not native_bf16:
        raise MinibertError(f"precision bf16: {torch.cuda.get_device_name(device)} has no native "
                            f"bf16; use fp16 or auto")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision: matmuls in fp16/bf16, reductions and the loss in fp32 (torch.autocast
    decides per operation). Weights and optimizer state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
