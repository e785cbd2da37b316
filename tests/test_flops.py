"""MFU peaks: each board gets its own datasheet peak, matched on whole words of the name
that torch.cuda.get_device_name() reports."""

import pytest

from minibert.flops import peak_tflops


@pytest.mark.parametrize("device_name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM module
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "bf16", 835.0),
    ("NVIDIA H100 NVL", "fp32", 60.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA H200 NVL", "fp16", 835.0),
    ("NVIDIA GH200 480GB", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
    ("Tesla T4", "fp16", 65.0),
    ("NVIDIA T400", "fp16", None),  # not a T4: no tensor cores, not in the table
    ("NVIDIA T400 4GB", "fp32", None),
    ("Tesla T4", "bf16", None),  # the T4 has no bf16 tensor cores
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_each_board_gets_its_own_peak(device_name, precision, expected):
    assert peak_tflops(device_name, precision) == expected


@pytest.mark.parametrize("embedding_size", [None, 16], ids=["bert", "electra"])
def test_forward_flops_count_every_matrix_multiply(embedding_size):
    """forward_flops = what torch's FlopCounterMode counts in one forward with 5 targets
    (training mode on a CPU: attention written out, so its two products are counted too),
    ELECTRA's embedding projection and narrower head included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from minibert.flops import forward_flops
    from minibert.model import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        embedding_size=embedding_size)
    model = BertForMaskedLM(config).train()
    ids = torch.randint(5, 1000, (1, 32))
    labels = torch.full_like(ids, -100)
    labels[0, :5] = ids[0, :5]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.masked_logits(ids, labels)
    assert counter.get_total_flops() == forward_flops(config, seq_len=32, head_positions=5)
