"""What `precision = "auto"` picks on each kind of hardware, and what an explicit choice costs.

CPUs are tested for real: a fresh interpreter reads torch's own reports, once as this CPU is
and once capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2), which is how a
laptop CPU without AVX-512 looks to torch. The expectations follow from the CPU's instructions
alone, so the same test holds on an AMX Xeon, an AVX512-BF16 Zen 4 and an AVX2-only laptop.
GPUs are not here: a T4's and an A100's answers are given to torch.cuda by monkeypatching.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minibert import MinibertError
from minibert.precision import compile_note, precision_warning, resolve_precision
from test_train import cache_dir, config_flags, make_config, tiny_corpus, tiny_model  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
X86 = platform.machine().lower() in ("x86_64", "amd64")

PROBE = """
import json, sys, torch
from minibert.precision import cpu_bf16_support, precision_warning, resolve_precision
cpu = torch.device("cpu")
print("PROBE", json.dumps({
    "mkldnn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    "aten_capability": torch.backends.cpu.get_cpu_capability(),
    "instructions": dict(torch.cpu.get_capabilities()),
    "support": cpu_bf16_support(),
    "auto": resolve_precision("auto", cpu),
    "explicit_bf16": resolve_precision("bf16", cpu),
    "bf16_warning": precision_warning("bf16", cpu),
}))
if len(sys.argv) > 1:  # then train.py with these flags, in the same interpreter
    from train import main
    main(sys.argv[1:])
"""


def probe(caps: dict[str, str], train_flags: list[str] = ()) -> tuple[dict, str]:
    """torch's reports and minibert's choices in a fresh interpreter (the caps are read when
    torch loads, so they cannot be applied to this process), then train.py's output when
    `train_flags` are given."""
    env = {k: v for k, v in os.environ.items() if k not in CAPS}
    env.update(caps, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", PROBE, *train_flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE ")), result.stdout


@pytest.fixture(scope="module")
def native() -> dict:
    return probe({})[0]


def test_auto_on_this_cpu_is_bf16_exactly_where_it_has_bf16_instructions(native):
    # AMX (Sapphire Rapids and later) and AVX512-BF16 (Cooper Lake, Zen 4) multiply bf16
    # natively: bf16. Anything else (an AVX2 laptop; AVX-512 without BF16 such as Skylake-X or
    # Tiger Lake, where oneDNN converts to fp32) computes bf16 slower than fp32: fp32.
    instructions = native["instructions"]
    has_bf16 = any(instructions.get(name, False)
                   for name in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))
    assert native["auto"] == ("bf16" if has_bf16 and native["mkldnn_bf16"] else "fp32"), native
    if X86 and not instructions.get("avx512_f", False):  # an AVX2 laptop: no oneDNN bf16 kernel
        assert native["support"] == "none" and native["auto"] == "fp32"
    assert native["explicit_bf16"] == "bf16"  # an explicit choice is always honoured
    assert (native["bf16_warning"] is None) == (native["auto"] == "bf16")


@pytest.mark.skipif(not X86, reason="ONEDNN_MAX_CPU_ISA=AVX2 caps x86 CPUs only")
def test_a_cpu_capped_to_avx2_trains_in_fp32_and_bf16_warns_with_its_cost(make_config):
    # train.py end to end under the caps, precision auto as the shipped configs say.
    config = make_config("capped", max_steps=1, eval_every=0, precision="auto")
    capped, out = probe(CAPS, config_flags(config))
    # What torch itself reports under the caps, whatever the CPU: no bf16 matmul kernel.
    assert capped["mkldnn_bf16"] is False and capped["aten_capability"] == "AVX2", capped
    assert capped["support"] == "none" and capped["auto"] == "fp32"
    assert "1 process(es) on cpu, fp32;" in out, out[-2000:]
    assert capped["explicit_bf16"] == "bf16"  # still allowed
    warning = capped["bf16_warning"]
    assert warning.startswith("warning: precision bf16") and "\n" not in warning
    assert "slower than fp32" in warning and "--precision auto" in warning


def test_fp16_on_a_cpu_warns_and_points_at_auto():
    warning = precision_warning("fp16", torch.device("cpu"))
    assert warning.startswith("warning: precision fp16 on a CPU") and "--precision auto" in warning


# ---------------------------------------------------------------------------------------------
# GPUs, by their answers


def pretend_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> torch.device:
    """torch.cuda answering as `name` would (is_bf16_supported: True on every CUDA GPU with
    its default including_emulation=True, a T4 included)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return torch.device("cuda", 0)


def test_a_t4_gets_fp16_and_bf16_is_refused_though_torch_says_bf16_is_supported(monkeypatch):
    t4 = pretend_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert torch.cuda.is_bf16_supported()  # the answer minibert must not trust
    assert resolve_precision("auto", t4) == "fp16"
    assert resolve_precision("fp16", t4) == "fp16"
    with pytest.raises(MinibertError, match=r"Tesla T4 \(compute capability 7.5\) has no bf16 "
                                            r"tensor cores.*use fp16 or auto"):
        resolve_precision("bf16", t4)
    note = compile_note(t4)
    assert note.startswith("note: compile on Tesla T4 (compute capability 7.5) is not measured")


def test_ampere_and_newer_get_bf16_and_no_compile_note(monkeypatch):
    a100 = pretend_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))
    assert resolve_precision("auto", a100) == "bf16"
    assert resolve_precision("bf16", a100) == "bf16"
    assert compile_note(a100) is None
    assert compile_note(torch.device("cpu")) is None
