"""What each precision costs on this CPU: the quickstart's training step, and one bert-base matmul.

    python benchmarks/precision.py                                         # this CPU as it is
    python benchmarks/precision.py --config configs/pretrain-cpu.toml     # that config's step
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/precision.py   # as a laptop
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/precision.py          # AVX-512 without BF16

The step is the one train.py runs for the config (by default configs/quickstart-cpu.toml:
bert-tiny, 32 x 128; forward, backward, clipping, fused AdamW) on one fixed masked batch,
built by the trainer's own setup() and build() once per precision from the same weights. The precisions
alternate step by step (A B, B A, ...), so other processes on the machine slow them alike;
the ratios to fp32 are the numbers to quote. The matmul is bert-base's feed-forward
projection at the quickstart's 4,096 tokens ((4096, 768) @ (768, 3072)) under the same
autocast. The first lines say what torch reports about the CPU and what `precision = "auto"`
resolves to here.

The two environment variables cap what torch uses without changing the hardware: oneDNN
stops at AVX2 (no bf16 matmul kernel), ATen's vector kernels at AVX2. A laptop CPU without
AVX-512 runs like that. ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps oneDNN's AVX-512 kernels but
not the BF16 instructions, as on Skylake-X, Cascade Lake or Ice/Tiger Lake.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from common import interleaved, median
from minibert.batches import prepare_step
from minibert.optimizer import optimizer_step
from minibert.precision import autocast, cpu_bf16_support, resolve_precision
from minibert.train_config import parse_config
from minibert.trainer import build, setup

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart-cpu.toml"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG), help="a CPU config whose step to time")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per precision")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    cpu = torch.device("cpu")
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    print(f"cpu: {cpu_name()}; {torch.get_num_threads()} threads; caps: {caps or 'none'}; "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print(f"torch reports: mkldnn bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
          f"ATen capability {torch.backends.cpu.get_cpu_capability()}, bf16 instructions "
          f"{[k for k, v in torch.cpu.get_capabilities().items() if 'bf16' in k and v]}; "
          f"cpu_bf16_support: {cpu_bf16_support()}; auto -> {resolve_precision('auto', cpu)}")

    with tempfile.TemporaryDirectory() as out_dir:
        # The shipped configs name the assets relative to the repository root.
        config_path = str(Path(args.config).resolve())
        os.chdir(REPO)
        config = parse_config(["--config", config_path, "--out_dir", out_dir, "--device", "cpu"])
        run = setup(config, environ={})
        batch = prepare_step(run.train_blocks, run.layout, run.mask, step=0)
        trainees = {p: build(replace(config, precision=p),
                             replace(run, precision=p, model=copy.deepcopy(run.model)))
                    for p in precisions}
        steps = {p: (lambda t=t: optimizer_step(t, batch, batch.count)) for p, t in trainees.items()}
        step_s = interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=cpu)

    x, w = torch.randn(4096, 768), torch.randn(768, 3072)

    def matmul(p: str):
        def call() -> None:
            with autocast(cpu, p):
                x @ w
        return call
    matmul_s = interleaved({p: matmul(p) for p in precisions}, repeats=args.repeats,
                           warmup=1, device=cpu)

    base = "fp32" if "fp32" in precisions else precisions[0]
    for p in precisions:
        print(f"{p:5s} step {median(step_s[p]):7.3f} s (x{median(step_s[p]) / median(step_s[base]):.2f}"
              f" {base}), matmul {median(matmul_s[p]) * 1e3:8.1f} ms "
              f"(x{median(matmul_s[p]) / median(matmul_s[base]):.2f})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
