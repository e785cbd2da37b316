"""Device and numerics of a run: where it computes, in which precision, and the autocast
context for it. The choices are named here, once, for train.py and every command.

    check_device(device); check_precision(precision)    # a MinibertError for a choice not offered
    device_type = resolve_device("auto")                # "cuda" when a GPU is visible, else "cpu"
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

DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when a GPU is visible
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: bf16 where supported, else fp16


def check_device(device: str) -> None:
    """A one-line MinibertError unless `device` is one of DEVICES."""
    if device not in DEVICES:
        raise MinibertError(f"device must be one of {'|'.join(DEVICES)}, got {device!r}")


def check_precision(precision: str) -> None:
    """A one-line MinibertError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise MinibertError(f"precision must be one of {'|'.join(PRECISIONS)}, got {precision!r}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without one is an error."""
    if device == "cuda" and not torch.cuda.is_available():
        raise MinibertError("device cuda: no CUDA device is visible")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


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


def precision_warning(precision: str, device: torch.device) -> str | None:
    """A one-line warning when the precision works but is needlessly slow here, else None.

    fp16 on a CPU: the CPU has fast bf16 matmuls (AMX, AVX-512 BF16) but none for fp16, and
    the GradScaler adds an inf/NaN check of every gradient. It stays allowed: it is how the
    loss-scaling path is tested without a GPU."""
    if precision == "fp16" and device.type == "cpu":
        return ("warning: precision fp16 on a CPU is several times slower than bf16 for the "
                "same loss; use --precision bf16 (fp16 here is for testing loss scaling)")
    return None


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision: matmuls in fp16/bf16, reductions and the loss in fp32 (torch.autocast
    decides per operation). Weights and optimizer state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
