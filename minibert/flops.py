"""How many floating-point operations a BERT training step does, and what fraction of the
hardware's peak that is (model FLOPs utilisation, MFU).

Counted are the matrix multiplies, 2 FLOPs per multiply-add; LayerNorm, softmax, GELU and
embedding look-ups are a few percent and left out, as in the usual MFU convention. The
backward pass costs twice the forward (one product for the input's gradient, one for the
weight's), so a training step is 3x the forward.

Per token and layer, forward, with H = hidden_size, I = intermediate_size, S = seq length:
    Q, K, V and output projections   2 * 4 * H * H
    feed-forward (two matrices)      2 * 2 * H * I
    scores QK^T and weights x V      2 * 2 * S * H
Masked-LM head, per position it is computed at (only the masked ones in training):
    transform dense                  2 * H * H
    decoder onto the vocabulary      2 * H * vocab_size
ELECTRA's embeddings are E = embedding_size wide, not H: each token's projection up to H
costs 2 * E * H, and the head's dense and decoder 2 * H * E and 2 * E * vocab_size.
"""

from __future__ import annotations

import re

from .model import BertConfig

# Dense peak TFLOP/s (no sparsity: half the datasheet's "with sparsity" figure) of common
# accelerators, by the precision that matmuls run in, from NVIDIA's datasheets. fp32 on
# A100/H100 means true fp32; PyTorch's default keeps TF32 off for matmuls. One chip name covers
# boards with different peaks (an H100 PCIe card runs at 76% of an SXM module's), and "T4"
# is part of "T400", a small workstation card without tensor cores: so each entry is a pattern
# matched on whole words of torch.cuda.get_device_name(), the most specific first.
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    # (pattern, board, peaks)           e.g. the device name
    (r"\bH100\b.*\bNVL\b", "H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (r"\bH100\b", "H100 SXM", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # H100 80GB HBM3
    (r"\bH200\b.*\bNVL\b", "H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"\bG?H200\b", "H200 / GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"\bA100\b", "A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),  # SXM4 and PCIe alike
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),  # Tesla T4; not the T400
]


def forward_flops(config: BertConfig, seq_len: int, head_positions: float) -> float:
    """Forward FLOPs for one sequence whose MLM head runs at `head_positions` positions."""
    h, i, e = config.hidden_size, config.intermediate_size, config.embedding_width
    per_token_layer = 2 * 4 * h * h + 2 * 2 * h * i + 2 * 2 * seq_len * h
    encoder = config.num_hidden_layers * seq_len * per_token_layer
    projection = seq_len * 2 * e * h if e != h else 0
    head = head_positions * (2 * h * e + 2 * e * config.vocab_size)
    return float(encoder + projection + head)


def training_flops_per_token(config: BertConfig, seq_len: int,
                             mlm_probability: float = 0.15) -> float:
    """Forward + backward FLOPs per input token, the head computed at masked positions only."""
    return 3.0 * forward_flops(config, seq_len, mlm_probability * seq_len) / seq_len


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak TFLOP/s for a device name such as 'NVIDIA H100 80GB HBM3', or None if unknown
    (then MFU is not reported, unless the run's peak_tflops setting gives the peak)."""
    for pattern, _, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name.upper()):
            return peaks.get(precision)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over peak FLOP/s (a fraction), or None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12)
