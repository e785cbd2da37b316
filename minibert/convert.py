"""Name and tensor mapping between HuggingFace BERT checkpoints and minibert.

Pure functions on state dicts; reading and writing folders is minibert/checkpoint.py's job.

    HuggingFace (BertForMaskedLM)                        minibert (BertForMaskedLM)
    bert.embeddings.LayerNorm.weight                     bert.embeddings.layer_norm.weight
    bert.encoder.layer.{i}.attention.self.query/key/value  bert.layers.{i}.attention.qkv  (stacked)
    bert.encoder.layer.{i}.attention.output.dense        bert.layers.{i}.attention.out
    bert.encoder.layer.{i}.attention.output.LayerNorm    bert.layers.{i}.attention_norm
    bert.encoder.layer.{i}.intermediate.dense            bert.layers.{i}.intermediate
    bert.encoder.layer.{i}.output.dense                  bert.layers.{i}.output
    bert.encoder.layer.{i}.output.LayerNorm              bert.layers.{i}.output_norm
    cls.predictions.transform.dense                      mlm_head.dense
    cls.predictions.transform.LayerNorm                  mlm_head.layer_norm
    cls.predictions.bias                                 mlm_head.bias
    cls.predictions.decoder.weight                       (tied: bert.embeddings.word_embeddings)
    bert.pooler.dense                                    bert.pooler.dense  (when present)

BertModel checkpoints have no `bert.` prefix and no head; BertForPreTraining ones add the
next-sentence head `cls.seq_relationship`, which is dropped with a notice: minibert trains
masked-LM only and exports BertForMaskedLM, which has no place for it. The pooler is kept
(masked-LM training leaves it untouched), so that an exported model reaches a classifier with
its pretrained pooler. TF-era checkpoints call LayerNorm's parameters gamma and beta.
"""

from __future__ import annotations

import re

import torch

from .errors import MinibertError
from .model import BertConfig

# Per-layer renames (HF suffix after "encoder.layer.{i}." -> minibert suffix after "layers.{i}.").
_LAYER_NAMES = {
    "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.LayerNorm": "embeddings.layer_norm",
}
_HEAD_NAMES = {
    "cls.predictions.transform.dense": "mlm_head.dense",
    "cls.predictions.transform.LayerNorm": "mlm_head.layer_norm",
}
_QKV = ("query", "key", "value")

# HuggingFace config keys that minibert's BertConfig carries over one to one.
HF_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "hidden_act", "hidden_dropout_prob",
                  "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
                  "layer_norm_eps", "pad_token_id", "initializer_range")


def config_from_hf(hf_config: dict) -> BertConfig:
    """A HuggingFace config.json dict -> BertConfig; rejects what minibert does not model."""
    model_type = hf_config.get("model_type", "bert")
    if model_type != "bert":
        raise MinibertError(f"model_type is {model_type!r}, minibert converts 'bert' checkpoints")
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise MinibertError(f"position_embedding_type {position_type!r} is not supported "
                            "(minibert has BERT's absolute learned positions)")
    if hf_config.get("is_decoder"):
        raise MinibertError("is_decoder is true: minibert is a bidirectional encoder only")
    return BertConfig(**{k: hf_config[k] for k in HF_CONFIG_KEYS if hf_config.get(k) is not None})


def config_to_hf(config: BertConfig) -> dict:
    """BertConfig -> a HuggingFace config.json dict for BertForMaskedLM."""
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert",
            "position_embedding_type": "absolute", "tie_word_embeddings": True,
            **{k: getattr(config, k) for k in HF_CONFIG_KEYS}}


def _modern_name(name: str) -> str:
    """Old TF-era names (LayerNorm.gamma/beta) -> current ones (LayerNorm.weight/bias)."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                  re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def hf_to_minibert(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HuggingFace BertModel / BertForMaskedLM / BertForPreTraining weights -> minibert names.

    Returns (state_dict, notices). The state dict lacks the mlm_head.* entries when the
    checkpoint has no masked-LM head, and the bert.pooler.* ones when it has no pooler; the
    caller decides what to do about that. Unknown keys raise MinibertError, so a checkpoint
    of another architecture is never half-loaded.
    """
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    dropped: list[str] = []  # the next-sentence head
    decoder_weight = None
    for raw_name, tensor in hf_state.items():
        name = _modern_name(raw_name)
        if name.startswith("bert."):
            name = name[len("bert."):]
        if name.endswith("position_ids") or name.endswith("token_type_ids"):
            continue  # index buffers that some versions saved; they hold no weights
        if name.startswith("cls.seq_relationship."):
            dropped.append(raw_name)
            continue
        if name == "cls.predictions.decoder.weight":
            decoder_weight = tensor
            continue
        if name in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
            out["mlm_head.bias"] = tensor  # the decoder's bias is tied to this one in HF
            continue
        prefix, param = name.rsplit(".", 1)
        layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", prefix)
        if layer:
            index, rest = int(layer.group(1)), layer.group(2)
            if rest.startswith("attention.self.") and rest.split(".")[-1] in _QKV:
                qkv_parts.setdefault((index, param), {})[rest.split(".")[-1]] = tensor
                continue
            if rest in _LAYER_NAMES:
                out[f"bert.layers.{index}.{_LAYER_NAMES[rest]}.{param}"] = tensor
                continue
        elif prefix in _EMBEDDING_NAMES:
            out[f"bert.{_EMBEDDING_NAMES[prefix]}.{param}"] = tensor
            continue
        elif prefix in _HEAD_NAMES:
            out[f"{_HEAD_NAMES[prefix]}.{param}"] = tensor
            continue
        elif prefix == "pooler.dense":
            out[f"bert.pooler.dense.{param}"] = tensor
            continue
        raise MinibertError(f"unexpected weight {raw_name!r}: not a BERT checkpoint minibert knows")
    for (index, param), parts in sorted(qkv_parts.items()):
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise MinibertError(f"layer {index} lacks attention.self.{missing[0]}.{param}")
        # Stacked in the order q, k, v along the output dimension: rows [0:H] are Q.
        out[f"bert.layers.{index}.attention.qkv.{param}"] = torch.cat([parts[p] for p in _QKV])
    notices = []
    if dropped:
        notices.append(f"dropped the next-sentence head cls.seq_relationship ({len(dropped)} "
                       f"tensors): minibert trains and exports masked-LM only")
    word_embeddings = out.get("bert.embeddings.word_embeddings.weight")
    if (decoder_weight is not None and word_embeddings is not None
            and not torch.equal(decoder_weight, word_embeddings)):
        notices.append("cls.predictions.decoder.weight differs from the word embeddings; "
                       "minibert ties them and keeps the word embeddings")
    return out, notices


def minibert_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minibert BertForMaskedLM weights -> HuggingFace BertForMaskedLM names.

    The decoder matrix is not written: HuggingFace ties it to the word embeddings on load,
    as its own save_pretrained does. The pooler, when the model has one, is written as
    bert.pooler.dense: BertForMaskedLM ignores it, BertForSequenceClassification starts from it.
    """
    embedding_names = {v: k for k, v in _EMBEDDING_NAMES.items()}
    layer_names = {v: k for k, v in _LAYER_NAMES.items()}
    head_names = {v: k for k, v in _HEAD_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        prefix, param = name.rsplit(".", 1)
        layer = re.fullmatch(r"bert\.layers\.(\d+)\.(.+)", prefix)
        if name == "mlm_head.bias":
            out["cls.predictions.bias"] = tensor
        elif prefix.startswith("bert.embeddings."):
            out[f"bert.{embedding_names[prefix[len('bert.'):]]}.{param}"] = tensor
        elif layer and layer.group(2) == "attention.qkv":
            for part, chunk in zip(_QKV, tensor.chunk(3)):
                out[f"bert.encoder.layer.{layer.group(1)}.attention.self.{part}.{param}"] = chunk
        elif layer:
            out[f"bert.encoder.layer.{layer.group(1)}.{layer_names[layer.group(2)]}.{param}"] = tensor
        elif prefix in head_names:
            out[f"{head_names[prefix]}.{param}"] = tensor
        elif prefix == "bert.pooler.dense":
            out[f"bert.pooler.dense.{param}"] = tensor
        else:
            raise MinibertError(f"unexpected minibert weight {name!r}")
    return out
