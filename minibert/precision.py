"""Device and numerics of a run: where it computes, in which precision, and the autocast
context for it. The choices are named here, once, for train.py and every command.

    check_device(device); check_precision(precision)    # a MinibertError for a choice not offered
    device_type = resolve_device("auto")                # "cuda" when a GPU is visible, else "cpu"
    precision = resolve_precision("auto", device)      # bf16 where the hardware computes it
    with autocast(device, precision):
        loss = model(inputs, labels=labels)

`auto` picks bf16 only where the hardware multiplies bf16 matrices natively: GPUs of compute
capability 8.0 (Ampere) or newer, and CPUs with bf16 instructions that torch uses
(cpu_bf16_support). Elsewhere it picks fp16 with loss scaling on a GPU (the T4) and fp32 on a
CPU, because there bf16 is emulated and slower than what it replaces. Training and evaluation
both run the model under `autocast`; weights and optimizer state stay fp32 whatever the
precision.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import MinibertError

DEVICES = ("auto", "cpu", "cuda")  # auto: cuda when a GPU is visible
# auto: bf16 where the hardware computes it natively, else fp16 on a GPU and fp32 on a CPU
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# bf16 arithmetic instructions, by the names torch.cpu.get_capabilities() gives them: x86's
# AVX512-BF16 (bf16 dot products) and AMX-BF16 (tile matmuls), Arm's BF16 and SVE-BF16.
CPU_BF16_INSTRUCTIONS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


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


def cpu_bf16_support() -> str:
    """How this CPU multiplies bf16 matrices, as torch reports it: "native", "converted" or
    "none". Only with "native" is bf16 as fast as fp32 or faster; "auto" picks it there alone.

    Two of torch's reports decide, because each alone misleads:
    - torch.ops.mkldnn._is_mkldnn_bf16_supported() is the test torch itself applies before
      it hands a bf16 matmul to oneDNN (ideep::has_bf16_type_support: oneDNN's usable
      instruction set reaches AVX-512, or in newer versions AVX2 with AVX-NE-CONVERT). Where it is False, bf16
      matmuls fall to ATen's generic kernel, which works element by element: "none". It reads
      oneDNN's instruction set as capped by ONEDNN_MAX_CPU_ISA, so a capped process sees what
      a laptop without AVX-512 sees.
    - torch.cpu.get_capabilities() lists the CPU's instructions (from cpuinfo). oneDNN's bf16
      kernels compute in bf16 only with CPU_BF16_INSTRUCTIONS; with plain AVX-512 (Skylake-X,
      Cascade Lake, Ice and Tiger Lake) they convert to fp32 and multiply in fp32:
      "converted". This list ignores ONEDNN_MAX_CPU_ISA, which is why it is the second test
      and not the only one (a cap to AVX512_CORE on a CPU that has AVX512-BF16 still reads
      "native", a case no real CPU is in).
    torch.backends.cpu.get_cpu_capability() (DEFAULT, AVX2, AVX512) is not used: it names the
    vector width of ATen's element-wise kernels and says nothing of bf16 instructions.

    The quickstart's step in bf16 against fp32 on the same CPU (benchmarks/README.md,
    "Precision on a CPU"): native 1.0x on a Xeon with AMX and 0.6-0.9x on a Zen 4 with
    AVX512-BF16; converted 1.2-1.8x (the Zen 4 capped to AVX512_CORE); none 2-60x (both
    capped to AVX2, 57x on the quiet Xeon), with a bert-base-sized matmul 80-100x."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "none"
    if hasattr(torch.cpu, "get_capabilities"):  # recent torch; older ones have the two below
        capabilities = torch.cpu.get_capabilities()
    else:
        capabilities = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                        "amx_bf16": torch.cpu._is_amx_tile_supported()}
    if any(capabilities.get(name, False) for name in CPU_BF16_INSTRUCTIONS):
        return "native"
    return "converted"


def cuda_native_bf16(device: torch.device) -> bool:
    """Compute capability 8.0 (Ampere) or newer: bf16 tensor cores. Older GPUs (the T4 is 7.5)
    emulate bf16 in fp32 arithmetic, though torch.cuda.is_bf16_supported() answers True there
    (it only checks that a bf16 tensor can be made), so the capability decides."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware computes it natively (cuda_native_bf16,
    cpu_bf16_support), else fp16 (with loss scaling) on a GPU and fp32 on a CPU.

    Why this is the rule on a CPU: where bf16 is native it is as fast as fp32 or faster (the
    quickstart's steps: 1.0x on a Xeon with AMX, 0.6-1.0x on a Zen 4, and larger models gain
    more: pretrain-cpu's step 0.53x and 0.86x), so auto loses nothing against either; where it
    is not, bf16 costs 1.2x to 60x (cpu_bf16_support), and fp32 is what auto must match.

    An explicit bf16 on a GPU without bf16 tensor cores is an error (its emulation is several
    times slower than fp16, and Triton cannot compile bf16 for it); on a CPU without native
    bf16 it stays allowed, and precision_warning says what it costs."""
    if device.type == "cuda":
        native_bf16 = cuda_native_bf16(device)
        if precision == "auto":
            return "bf16" if native_bf16 else "fp16"
        if precision == "bf16" and not native_bf16:
            raise MinibertError(f"precision bf16: {describe_device(device)} has no bf16 tensor "
                                f"cores (torch emulates bf16 there, several times slower than "
                                f"fp16); use fp16 or auto")
        return precision
    if precision == "auto":
        return "bf16" if cpu_bf16_support() == "native" else "fp32"
    return precision


def describe_device(device: torch.device) -> str:
    """The device in words, for one-line messages: 'Tesla T4 (compute capability 7.5)', 'the
    CPU'."""
    if device.type != "cuda":
        return "the CPU"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def precision_warning(precision: str, device: torch.device) -> str | None:
    """A one-line warning when the precision works but is needlessly slow here, else None.

    fp16 on a CPU: fast fp16 matmuls need AVX512-FP16 or AMX-FP16, which few CPUs have (the
    quickstart's step took 6.6x fp32's on a Zen 4), and the GradScaler adds an inf/NaN check
    of every gradient. It stays allowed: it is how the loss-scaling path is tested without a
    GPU. bf16 on a CPU without native bf16 (cpu_bf16_support): allowed, at
    the cost measured in benchmarks/README.md."""
    if device.type != "cpu":
        return None
    if precision == "fp16":
        return ("warning: precision fp16 on a CPU is slower than auto for the same loss (a "
                "quickstart step: 6.6x fp32's on a Zen 4); use --precision auto (fp16 here is "
                "for testing loss scaling)")
    if precision == "bf16":
        support = cpu_bf16_support()
        if support == "none":
            return ("warning: precision bf16 on a CPU without a bf16 matmul kernel (torch's "
                    "oneDNN reports none: no AVX-512), where matmuls run element by element: "
                    "quickstart steps measured 2-60x slower than fp32; use --precision auto "
                    "(fp32 here)")
        if support == "converted":
            return ("warning: precision bf16 on a CPU without bf16 instructions (AVX-512 but "
                    "no AVX512-BF16 or AMX), where oneDNN converts to fp32: quickstart steps "
                    "measured 1.2-1.8x slower than fp32; use --precision auto (fp32 here)")
    return None


def compile_note(device: torch.device) -> str | None:
    """One line for `compile = true` on a GPU older than compute capability 8.0, else None:
    Triton, which torch.compile generates its GPU kernels with, supports 8.0 and newer, and
    minibert's compiled timings come from such GPUs only."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8:
        return None
    return (f"note: compile on {describe_device(device)} is not measured (minibert's compile "
            f"timings are from compute capability 8.0+, Triton's supported GPUs); if compiling "
            f"fails, the run continues without it")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision: matmuls in fp16/bf16, reductions and the loss in fp32 (torch.autocast
    decides per operation). Weights and optimizer state stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
