"""One masked-LM training step, minibert against transformers' BertForMaskedLM.

    python benchmarks/train_step.py --preset small --seq 128 --batch 16 --precision fp32
    python benchmarks/train_step.py --preset small --precision bf16 --threads 2
    python benchmarks/train_step.py --preset base --seq 512 --batch 4 --steps 3
    python benchmarks/train_step.py --preset base --device cuda --precision bf16 --batch 32

Both models hold the same weights (transformers' random init with --seed, converted by
minibert.convert) and train on the same batch (15% of positions masked, 80/10/10; full blocks,
so no attention mask) in the same process with the same thread count: forward, backward and
an AdamW step, under torch.autocast for bf16/fp16. transformers gets labels with -100 at
unmasked positions and computes its usual head over every position; minibert computes its
head at the masked positions only. The steps alternate between the two implementations; the
last line is the ratio of median tokens/s.

Peak memory is how far a step raises memory above the weights and optimizer state held before
it: on CUDA the allocator's peak, on CPU the resident-size high-water mark in a fresh process
per implementation (see benchmarks/README.md). MFU counts the FLOPs a step needs (the head at
the masked positions, as minibert.flops does) for both, against the accelerator's peak, or on
a CPU the best 2048^3 matmul timed between the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from dataclasses import dataclass

import torch

from common import (IMPLEMENTATIONS, MatmulProbe, cpu_step_peak_bytes, cuda_step_peak_bytes,
                    interleaved, median, mib, paired_models)
from minibert.flops import mfu, peak_tflops, training_flops_per_token
from minibert.model import BertConfig

PRESETS = {
    "small": BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                        intermediate_size=1024),
    "base": BertConfig(),  # bert-base: 12 layers, 768 hidden, 12 heads, 3072 intermediate
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("fused", "foreach", "for-loop")


@dataclass
class TrainStepArgs:
    """What to measure; see --help for each field."""

    preset: str = "small"  # a key of PRESETS
    seq: int = 128  # tokens per sequence
    batch: int = 16  # sequences per step
    precision: str = "fp32"  # fp32, or bf16 / fp16 under torch.autocast
    device: str = "cpu"  # cpu or cuda
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    steps: int = 10  # timed steps per implementation
    warmup: int = 2  # untimed steps per implementation first
    optimizer: str = "fused"  # AdamW implementation, the same for both models
    compile: bool = False  # torch.compile minibert's model (transformers stays eager)
    compile_mode: str | None = None  # torch.compile's mode: max-autotune, reduce-overhead, ...
    memory: bool = True  # also measure peak memory
    peak_tflops: float | None = None  # overrides the accelerator's table entry / measured matmul
    seed: int = 0  # weights and batch
    memory_of: str | None = None  # internal: measure this implementation's memory and exit

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}")
        if self.precision not in DTYPES:
            raise ValueError(f"--precision must be one of {sorted(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}")
        if not 1 <= self.seq <= PRESETS[self.preset].max_position_embeddings:
            raise ValueError("--seq must be between 1 and 512")
        if self.batch < 1 or self.steps < 1 or self.warmup < 0:
            raise ValueError("--batch and --steps must be positive, --warmup not negative")

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.batch


def masked_batch(config: BertConfig, batch: int, seq: int, device: torch.device, seed: int,
                 mlm_probability: float = 0.15) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, labels): random word pieces, 15% of them targets (80% [MASK],
    10% random, 10% kept), no padding."""
    generator = torch.Generator().manual_seed(seed)
    first_word_piece, mask_token_id = 999, 103  # bert-base-uncased: [unusedN] and specials below
    tokens = torch.randint(first_word_piece, config.vocab_size, (batch, seq), generator=generator)
    chosen = torch.rand(batch, seq, generator=generator) < mlm_probability
    draw = torch.rand(batch, seq, generator=generator)
    random_tokens = torch.randint(first_word_piece, config.vocab_size, (batch, seq),
                                  generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), mask_token_id, tokens)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, inputs)
    labels = torch.where(chosen, tokens, -100)
    # Training blocks are full, so neither model needs an attention mask; minibert's trainer
    # passes none, and neither do we, to either model.
    attention_mask = None
    return inputs.to(device), attention_mask, labels.to(device)


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    # "fused" is what transformers' Trainer picks by default (adamw_torch_fused) on torch >= 2.8.
    options = {"fused": {"fused": True}, "foreach": {"foreach": True},
               "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **options)


def make_step(name: str, model: torch.nn.Module, batch: tuple[torch.Tensor, ...],
              args: TrainStepArgs, device: torch.device):
    """A closure that runs forward, backward and the optimizer step once."""
    input_ids, attention_mask, labels = batch
    # minibert's trainer gathers the masked positions with a fixed (batch, k) shape, k the
    # most targets in a row, counted on the CPU side (here once, before the timed steps).
    max_targets = int((labels != -100).sum(dim=1).max())
    optimizer = make_optimizer(model, args.optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    autocast = (torch.autocast(device.type, DTYPES[args.precision])
                if args.precision != "fp32" else contextlib.nullcontext())
    model.train()

    def step() -> None:
        with autocast:
            if name == "minibert":  # labels given: the head runs at masked positions only
                loss = model(input_ids, attention_mask, labels=labels, max_targets=max_targets)
            else:
                loss = model(input_ids=input_ids, attention_mask=attention_mask,
                             labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def starting_losses(models: dict[str, torch.nn.Module], batch) -> dict[str, float]:
    """Both models' loss on the batch without dropout: equal weights must give equal losses."""
    input_ids, attention_mask, labels = batch
    losses = {}
    for name, model in models.items():
        model.eval()
        if name == "minibert":
            losses[name] = model(input_ids, attention_mask, labels=labels).item()
        else:
            losses[name] = model(input_ids=input_ids, attention_mask=attention_mask,
                                 labels=labels).loss.item()
    return losses


def build(args: TrainStepArgs, device: torch.device, only: str | None = None):
    config = PRESETS[args.preset]
    models = paired_models(config, args.seed)
    if only is not None:
        models = {only: models[only]}
    models = {name: model.to(device) for name, model in models.items()}
    batch = masked_batch(config, args.batch, args.seq, device, args.seed)
    return config, models, batch


def measure_memory_here(args: TrainStepArgs, device: torch.device) -> None:
    """The child process of cpu_memory: one implementation, warm-up, then one measured step."""
    _, models, batch = build(args, device, only=args.memory_of)
    model = models[args.memory_of]
    if args.compile and args.memory_of == "minibert":
        model = torch.compile(model, mode=args.compile_mode)
    step = make_step(args.memory_of, model, batch, args, device)
    for _ in range(max(args.warmup, 1)):
        step()
    print(f"peak_bytes {cpu_step_peak_bytes(step)}")


def cpu_memory(name: str, argv: list[str]) -> int:
    """Run this script again in a fresh process that builds and steps only `name`."""
    result = subprocess.run([sys.executable, __file__, *argv, "--memory-of", name],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1].split()[1])


def run(args: TrainStepArgs, argv: list[str]) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        measure_memory_here(args, device)
        return
    config, models, batch = build(args, device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"train_step: preset {args.preset} ({config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}, {config.num_attention_heads} heads, intermediate "
          f"{config.intermediate_size}, vocab {config.vocab_size}), seq {args.seq} x batch "
          f"{args.batch}, {args.precision}, {where}, AdamW {args.optimizer}, torch "
          f"{torch.__version__}"
          f"{', minibert compiled' if args.compile else ''}"
          f"{f' (mode {args.compile_mode})' if args.compile and args.compile_mode else ''}")
    losses = starting_losses(models, batch)
    print("loss before training (eval mode, fp32): "
          + "  ".join(f"{name} {loss:.6f}" for name, loss in losses.items()))
    if args.compile:
        models["minibert"] = torch.compile(models["minibert"], mode=args.compile_mode)
    steps = {name: make_step(name, model, batch, args, device) for name, model in models.items()}
    probe = MatmulProbe(DTYPES[args.precision], device)
    seconds = interleaved({**steps, "matmul": probe}, args.steps, args.warmup, device)

    if not args.memory:
        peaks = {}
    elif device.type == "cuda":
        peaks = {name: cuda_step_peak_bytes(step, device) for name, step in steps.items()}
    else:
        peaks = {name: cpu_memory(name, argv) for name in IMPLEMENTATIONS}

    peak = args.peak_tflops
    peak_source = "--peak-tflops"
    if peak is None and device.type == "cuda":
        peak, peak_source = peak_tflops(torch.cuda.get_device_name(device), args.precision), "table"
    if peak is None:
        peak = probe.tflops(seconds["matmul"])
        peak_source = f"best of {args.steps} 2048^3 matmuls timed between the steps"
    flops_per_token = training_flops_per_token(config, args.seq)
    print(f"MFU: {flops_per_token / 1e9:.3f} GFLOP per token (head at masked positions) over "
          f"a peak of {peak:.3f} TFLOP/s ({peak_source})")
    print(f"{'':14}{'tokens/s':>10}{'step s (median, min-max)':>30}{'peak memory':>14}{'MFU':>8}")
    speed = {}
    for name in IMPLEMENTATIONS:
        step_s = median(seconds[name])
        speed[name] = args.tokens_per_step / step_s
        memory = mib(peaks[name]) if name in peaks else "-"
        print(f"{name:14}{speed[name]:>10,.0f}"
              f"{f'{step_s:.3f} ({min(seconds[name]):.3f}-{max(seconds[name]):.3f})':>30}"
              f"{memory:>14}{mfu(speed[name], flops_per_token, peak):>8.1%}")
    print(f"ratio minibert/transformers tokens/s (medians of {args.steps} steps): "
          f"{speed['minibert'] / speed['transformers']:.2f}x")


def parse_args(argv: list[str]) -> TrainStepArgs:
    defaults = TrainStepArgs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=defaults.preset)
    parser.add_argument("--seq", type=int, default=defaults.seq)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--precision", choices=sorted(DTYPES), default=defaults.precision)
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                        help="AdamW implementation, used by both models")
    parser.add_argument("--compile", action="store_true", help="torch.compile minibert")
    parser.add_argument("--compile-mode", help="torch.compile mode for --compile: "
                        "max-autotune, reduce-overhead (CUDA graphs), ...")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurement")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--memory-of", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    return TrainStepArgs(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    argv = sys.argv[1:]
    try:
        arguments = parse_args(argv)
    except ValueError as error:
        sys.exit(f"train_step.py: error: {error}")
    run(arguments, argv)
