"""Name and config mapping between HuggingFace checkpoints of the BERT family and minibert.

Pure functions on state dicts and config dicts; reading and writing folders is
minibert/checkpoint.py's job.

Four HuggingFace families are BERT's encoder under other names: BERT itself (cased,
uncased, multilingual, large), RoBERTa, DistilBERT and ELECTRA (generator and
discriminator). Each is a `Family` below: one table of weight names (HuggingFace module ->
minibert module; each row covers .weight and .bias), the head's names, its config keys, and
the BertConfig fields its code fixes rather than its config.json (model.py reads them).
For BERT:

    HuggingFace (BertForMaskedLM)                        minibert (BertForMaskedLM)
    bert.embeddings.LayerNorm                            bert.embeddings.layer_norm
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

Encoder-only checkpoints (BertModel, RobertaModel, ...) have no `bert.` prefix and no head.
A head minibert does not train is dropped with a notice: BERT's next-sentence head
(cls.seq_relationship) and the ELECTRA discriminator's replaced-token head; minibert trains
and exports masked-LM only. The pooler is kept (masked-LM training leaves it untouched), so
that an exported model reaches a classifier with its pretrained pooler. TF-era checkpoints
call LayerNorm's parameters gamma and beta.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import MinibertError
from .model import BertConfig


@dataclass(frozen=True)
class Family:
    """How one HuggingFace family names its weights and its config."""

    name: str  # its model_type, and minibert's BertConfig.family
    masked_lm: str  # the HuggingFace class of the model with a masked-LM head (--to-hf)
    prefix: str  # the encoder's name inside that class ("bert"); encoder-only checkpoints lack it
    # HuggingFace module -> minibert module under "bert."; "qkv[k]": the k-th of the stacked q, k, v
    encoder: dict[str, str]
    head: dict[str, str]  # HuggingFace module -> minibert module of the masked-LM head
    decoder: str  # the decoder: its weight is the word embeddings (tied), its bias the head's
    config_keys: dict[str, str]  # HuggingFace config key -> BertConfig field
    fixed: dict[str, object]  # BertConfig fields the family's code fixes (no config key says them)
    defaults: dict[str, object] = field(default_factory=dict)  # HF's, where a key is left out
    dropped: dict[str, str] = field(default_factory=dict)  # module -> what it is; dropped


_BERT_KEYS = {k: k for k in (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "pad_token_id", "initializer_range")}
_BERT_FIXED = {"pad_offset_positions": False, "attention_output_dropout": True,
               "embedding_size": None}
# BERT, RoBERTa and ELECTRA name their encoders alike.
_BERT_ENCODER = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.LayerNorm": "embeddings.layer_norm",
    "encoder.layer.{i}.attention.self.query": "layers.{i}.attention.qkv[0]",
    "encoder.layer.{i}.attention.self.key": "layers.{i}.attention.qkv[1]",
    "encoder.layer.{i}.attention.self.value": "layers.{i}.attention.qkv[2]",
    "encoder.layer.{i}.attention.output.dense": "layers.{i}.attention.out",
    "encoder.layer.{i}.attention.output.LayerNorm": "layers.{i}.attention_norm",
    "encoder.layer.{i}.intermediate.dense": "layers.{i}.intermediate",
    "encoder.layer.{i}.output.dense": "layers.{i}.output",
    "encoder.layer.{i}.output.LayerNorm": "layers.{i}.output_norm",
    "pooler.dense": "pooler.dense",
}

BERT = Family(
    name="bert", masked_lm="BertForMaskedLM", prefix="bert", encoder=_BERT_ENCODER,
    head={"cls.predictions.transform.dense": "mlm_head.dense",
          "cls.predictions.transform.LayerNorm": "mlm_head.layer_norm",
          "cls.predictions": "mlm_head"},
    decoder="cls.predictions.decoder", config_keys=_BERT_KEYS, fixed=_BERT_FIXED,
    dropped={"cls.seq_relationship": "the next-sentence head"})
ROBERTA = Family(
    name="roberta", masked_lm="RobertaForMaskedLM", prefix="roberta", encoder=_BERT_ENCODER,
    head={"lm_head.dense": "mlm_head.dense", "lm_head.layer_norm": "mlm_head.layer_norm",
          "lm_head": "mlm_head"},
    decoder="lm_head.decoder", config_keys=_BERT_KEYS,
    # RobertaLMHead applies gelu whatever hidden_act says; minibert's head follows hidden_act.
    fixed={**_BERT_FIXED, "pad_offset_positions": True, "hidden_act": "gelu"},
    defaults={"vocab_size": 50265, "pad_token_id": 1})
DISTILBERT = Family(
    name="distilbert", masked_lm="DistilBertForMaskedLM", prefix="distilbert",
    encoder={"embeddings.word_embeddings": "embeddings.word_embeddings",
             "embeddings.position_embeddings": "embeddings.position_embeddings",
             "embeddings.LayerNorm": "embeddings.layer_norm",
             "transformer.layer.{i}.attention.q_lin": "layers.{i}.attention.qkv[0]",
             "transformer.layer.{i}.attention.k_lin": "layers.{i}.attention.qkv[1]",
             "transformer.layer.{i}.attention.v_lin": "layers.{i}.attention.qkv[2]",
             "transformer.layer.{i}.attention.out_lin": "layers.{i}.attention.out",
             "transformer.layer.{i}.sa_layer_norm": "layers.{i}.attention_norm",
             "transformer.layer.{i}.ffn.lin1": "layers.{i}.intermediate",
             "transformer.layer.{i}.ffn.lin2": "layers.{i}.output",
             "transformer.layer.{i}.output_layer_norm": "layers.{i}.output_norm"},
    head={"vocab_transform": "mlm_head.dense", "vocab_layer_norm": "mlm_head.layer_norm",
          "vocab_projector": "mlm_head"},
    decoder="vocab_projector",
    config_keys={"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
                 "n_heads": "num_attention_heads", "hidden_dim": "intermediate_size",
                 "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                 "attention_dropout": "attention_probs_dropout_prob",
                 "max_position_embeddings": "max_position_embeddings",
                 "pad_token_id": "pad_token_id", "initializer_range": "initializer_range"},
    # No segments; every LayerNorm at eps 1e-12; no dropout on the attention sublayer's output.
    fixed={**_BERT_FIXED, "type_vocab_size": 0, "layer_norm_eps": 1e-12,
           "attention_output_dropout": False},
    defaults={"n_layers": 6})
ELECTRA = Family(
    name="electra", masked_lm="ElectraForMaskedLM", prefix="electra",
    encoder={**{k: v for k, v in _BERT_ENCODER.items() if k != "pooler.dense"},
             "embeddings_project": "embeddings.projection"},
    head={"generator_predictions.dense": "mlm_head.dense",
          "generator_predictions.LayerNorm": "mlm_head.layer_norm",
          "generator_lm_head": "mlm_head"},
    decoder="generator_lm_head",
    config_keys={**_BERT_KEYS, "embedding_size": "embedding_size"},
    # ElectraGeneratorPredictions applies gelu whatever hidden_act says.
    fixed={"pad_offset_positions": False, "attention_output_dropout": True, "hidden_act": "gelu"},
    defaults={"embedding_size": 128, "hidden_size": 256, "num_attention_heads": 4,
              "intermediate_size": 1024},
    dropped={"discriminator_predictions": "the discriminator's replaced-token head"})
FAMILIES = {family.name: family for family in (BERT, ROBERTA, DISTILBERT, ELECTRA)}


def check_family(config: BertConfig) -> None:
    """MinibertError unless `config` is a model its family's HuggingFace class can be: the
    fields that class fixes have its values, and only DistilBERT goes without token types."""
    family = FAMILIES[config.family]
    wrong = [(name, value) for name, value in family.fixed.items()
             if getattr(config, name) != value]
    if config.type_vocab_size == 0 and "type_vocab_size" not in family.fixed:
        wrong.append(("type_vocab_size", ">= 1"))
    if wrong:
        name, value = wrong[0]
        raise MinibertError(f"a {family.name} model has {name} {value!r} (its HuggingFace code "
                            f"fixes it), this config has {getattr(config, name)!r}")


def config_from_hf(hf_config: dict) -> BertConfig:
    """A HuggingFace config.json dict -> BertConfig; rejects what minibert does not model."""
    model_type = hf_config.get("model_type", "bert")
    if model_type not in FAMILIES:
        raise MinibertError(f"model_type is {model_type!r}, minibert converts "
                            f"{', '.join(map(repr, FAMILIES))} checkpoints")
    family = FAMILIES[model_type]
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise MinibertError(f"position_embedding_type {position_type!r} is not supported "
                            "(minibert has BERT's absolute learned positions)")
    if hf_config.get("sinusoidal_pos_embds"):
        raise MinibertError("sinusoidal_pos_embds is true: minibert learns its positions, "
                            "as distilbert-base does; fixed sinusoids are not supported")
    if hf_config.get("is_decoder"):
        raise MinibertError("is_decoder is true: minibert is a bidirectional encoder only")
    values = {**family.defaults, **{k: v for k, v in hf_config.items() if v is not None}}
    fields = {name: values[key] for key, name in family.config_keys.items() if key in values}
    # The fixed fields that no config key gives; the others (RoBERTa's hidden_act) are checked.
    fields.update({k: v for k, v in family.fixed.items() if k not in family.config_keys.values()})
    config = BertConfig(family=family.name, **fields)
    check_family(config)
    return config


def config_to_hf(config: BertConfig) -> dict:
    """BertConfig -> a HuggingFace config.json dict for its family's masked-LM class."""
    check_family(config)
    family = FAMILIES[config.family]
    values = {key: getattr(config, name) for key, name in family.config_keys.items()}
    if family is ELECTRA:
        values["embedding_size"] = config.embedding_width
    extra = {"sinusoidal_pos_embds": False} if family is DISTILBERT else {
        "position_embedding_type": "absolute"}
    return {"architectures": [family.masked_lm], "model_type": family.name,
            "tie_word_embeddings": True, **extra, **values}


def _modern_name(name: str) -> str:
    """Old TF-era names (LayerNorm.gamma/beta) -> current ones (LayerNorm.weight/bias)."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                  re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _pattern(module: str) -> re.Pattern:
    """A table row's module name as a regex; "{i}" matches a layer index."""
    return re.compile(re.escape(module).replace(r"\{i\}", r"(\d+)"))


def _rows(family: Family) -> list[tuple[re.Pattern, str, int | None, str]]:
    """(HF pattern, minibert module template, third of qkv or None, HF template) per row."""
    rows = []
    for table, minibert_prefix in ((family.encoder, "bert."), (family.head, "")):
        for hf, ours in table.items():
            part = re.fullmatch(r"(.+)\[(\d)\]", ours)
            target = minibert_prefix + (part.group(1) if part else ours)
            hf_name = f"{family.prefix}.{hf}" if table is family.encoder else hf
            rows.append((_pattern(hf), target, int(part.group(2)) if part else None, hf_name))
    return rows


def hf_to_minibert(hf_state: dict[str, torch.Tensor], family: str = "bert",
                   ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HuggingFace weights of `family` (its encoder-only, masked-LM or pre-training class) ->
    minibert names.

    Returns (state_dict, notices). The state dict lacks the mlm_head.* entries when the
    checkpoint has no masked-LM head, and the bert.pooler.* ones when it has no pooler; the
    caller decides what to do about that. Unknown keys raise MinibertError, so a checkpoint
    of another architecture is never half-loaded.
    """
    spec = FAMILIES[family]
    rows = _rows(spec)
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    dropped: dict[str, int] = {}  # heads minibert does not train, and their tensor counts
    decoder_weight = None
    for raw_name, tensor in hf_state.items():
        name = _modern_name(raw_name)
        if name.endswith("position_ids") or name.endswith("token_type_ids"):
            continue  # index buffers that some versions saved; they hold no weights
        module, param = name.rsplit(".", 1)
        head = next((d for d in spec.dropped if module == d or module.startswith(d + ".")), None)
        if head is not None:
            dropped[head] = dropped.get(head, 0) + 1
            continue
        if module == spec.decoder and param == "weight":
            decoder_weight = tensor
            continue
        if module == spec.decoder:  # the decoder's bias is tied to the head's bias in HF
            module = next(hf for hf, ours in spec.head.items() if ours == "mlm_head")
        if module.startswith(spec.prefix + "."):
            module = module[len(spec.prefix) + 1:]
        for pattern, target, part, _ in rows:
            if match := pattern.fullmatch(module):
                target = target.replace("{i}", match.group(1)) if match.groups() else target
                if part is None:
                    out[f"{target}.{param}"] = tensor
                else:
                    qkv_parts.setdefault((target, param), {})[part] = tensor
                break
        else:
            raise MinibertError(f"unexpected weight {raw_name!r}: not a {family} checkpoint "
                                f"minibert knows")
    for (target, param), parts in sorted(qkv_parts.items()):
        if len(parts) != 3:
            missing = next(i for i in range(3) if i not in parts)
            raise MinibertError(f"{target} lacks the {'qkv'[missing]} projection's {param}")
        # Stacked in the order q, k, v along the output dimension: rows [0:H] are Q.
        out[f"{target}.{param}"] = torch.cat([parts[0], parts[1], parts[2]])
    notices = [f"dropped {spec.dropped[module]} {module} ({count} tensors): minibert trains "
               f"and exports masked-LM only" for module, count in dropped.items()]
    word_embeddings = out.get("bert.embeddings.word_embeddings.weight")
    if (decoder_weight is not None and word_embeddings is not None
            and not torch.equal(decoder_weight, word_embeddings)):
        notices.append(f"{spec.decoder}.weight differs from the word embeddings; "
                       f"minibert ties them and keeps the word embeddings")
    return out, notices


def minibert_to_hf(state: dict[str, torch.Tensor], family: str = "bert",
                   ) -> dict[str, torch.Tensor]:
    """minibert weights -> the names of `family`'s HuggingFace masked-LM class.

    The decoder matrix is not written: HuggingFace ties it to the word embeddings on load,
    as its own save_pretrained does. The pooler, when the model has one, is written too:
    the masked-LM class ignores it, the sequence classifier starts from it.
    """
    spec = FAMILIES[family]
    rows = {}  # minibert module template -> HF module template, one per third of a qkv
    for _, target, part, hf in _rows(spec):
        rows.setdefault(target, {})[part] = hf
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module, param = name.rsplit(".", 1)
        index = re.search(r"\.(\d+)\.", module)
        template = module.replace(index.group(0), ".{i}.", 1) if index else module
        if template not in rows:
            raise MinibertError(f"unexpected minibert weight {name!r} for a {family} model")
        parts = rows[template]
        chunks = dict(enumerate(tensor.chunk(3))) if None not in parts else {None: tensor}
        for part, hf in parts.items():
            hf = hf.replace("{i}", index.group(1)) if index else hf
            out[f"{hf}.{param}"] = chunks[part]
    return out

