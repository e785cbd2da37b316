"""BERT in plain PyTorch: embeddings, encoder, pooler and the masked-LM head.

This is the architecture of Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding" (arXiv:1810.04805), written so that it can be read
top to bottom. Section numbers in comments refer to that paper.

    tokens -> BertEmbeddings -> BertLayer x N -> hidden states (batch, seq, hidden)
                                                     |                 |
                                   BertForMaskedLM: MaskedLMHead      BertPooler (on request)
                                     -> logits (batch, seq, vocab)     -> (batch, hidden)

BERT's kin differ in a few lines, each a BertConfig field read by one `if` where it differs
(docs/03-weights.md, 3.7): RoBERTa's positions (pad_offset_positions), DistilBERT's missing
token types and attention-output dropout, ELECTRA's narrower embeddings (embedding_size).

The module imports nothing from training or conversion code: it is a pure building block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BertConfig:
    """Shape and regularisation of a BERT model, in the paper's (and HuggingFace's) names."""

    vocab_size: int = 30522  # WordPiece vocabulary size (bert-base-uncased: 30,522)
    hidden_size: int = 768  # H, the width of every token's vector
    num_hidden_layers: int = 12  # L, the number of encoder layers
    num_attention_heads: int = 12  # A, heads per self-attention layer
    intermediate_size: int = 3072  # width of the feed-forward layer, 4H in the paper
    hidden_act: str = "gelu"  # feed-forward activation; "gelu" is the exact (erf) GELU
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and on each sublayer's output
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention weights
    max_position_embeddings: int = 512  # longest sequence the learned positions cover
    type_vocab_size: int = 2  # number of segments (sentence A / sentence B); 0: none (DistilBERT)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon used by the original checkpoints
    pad_token_id: int = 0  # id of [PAD]; its embedding row starts at zero
    initializer_range: float = 0.02  # std of the normal init of weights
    # The family's differences from BERT (the defaults are BERT's):
    family: str = "bert"  # bert|roberta|distilbert|electra: the names convert.py reads and writes
    pad_offset_positions: bool = False  # RoBERTa: positions count real tokens from pad_token_id + 1
    attention_output_dropout: bool = True  # DistilBERT: False, no dropout on attention's output
    embedding_size: int | None = None  # ELECTRA: embedding width, projected to H (None: H)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "embedding_width",
                     "max_sequence_length"):  # RoBERTa's: the positions past pad_token_id + 1
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be >= 0, got {self.type_vocab_size!r}")
        if self.family not in FAMILY_NAMES:
            raise ValueError(f"family {self.family!r} is not one of {', '.join(FAMILY_NAMES)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary")

    @property
    def head_dim(self) -> int:
        """Width of one attention head: H / A (64 for bert-base)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_width(self) -> int:
        """Width of the token, position and segment embeddings: H, or ELECTRA's embedding_size."""
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @property
    def max_sequence_length(self) -> int:
        """The longest input: every position, less RoBERTa's offset (514 positions: 512 tokens)."""
        return self.max_position_embeddings - self.pad_offset_positions * (self.pad_token_id + 1)

    @classmethod
    def from_dict(cls, values: dict) -> "BertConfig":
        """Build a config from a dict, ignoring keys that are not fields (HF configs have many)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# BERT uses the exact GELU; "gelu_new" (the tanh approximation) and relu appear in some kin.
ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh,
               "relu": F.relu}
FAMILY_NAMES = ("bert", "roberta", "distilbert", "electra")


class BertEmbeddings(nn.Module):
    """Token vector = word piece + absolute position + segment (section 3, Figure 2)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        width = config.embedding_width  # hidden_size (ELECTRA: its smaller embedding_size)
        self.word_embeddings = nn.Embedding(config.vocab_size, width,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        # DistilBERT was distilled without segments: type_vocab_size 0, no such embedding.
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, width)
                                      if config.type_vocab_size > 0 else None)
        self.layer_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # ELECTRA: embeddings narrower than the encoder are projected up to hidden_size.
        self.projection = (nn.Linear(width, config.hidden_size)
                           if width != config.hidden_size else None)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if self.config.pad_offset_positions:
            # RoBERTa (fairseq) numbers the real tokens pad_token_id + 1, + 2, ... and gives
            # every [PAD] the position pad_token_id, so padding never shifts a token's position.
            is_token = (input_ids != self.config.pad_token_id).long()  # (batch, seq)
            positions = is_token.cumsum(dim=1) * is_token + self.config.pad_token_id
        else:
            positions = torch.arange(seq_len, device=input_ids.device)  # (seq,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is None:
            if token_type_ids is not None:
                raise ValueError("token_type_ids given, but this model has no token types")
        elif token_type_ids is None:
            # A single segment: every token is sentence A, whose row is token type 0.
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.layer_norm(x))  # (batch, seq, embedding width)
        return x if self.projection is None else self.projection(x)  # (batch, seq, hidden)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V, written out, with dropout on the attention weights.

    q, k, v: (batch, heads, seq, head_dim). key_padding_mask: (batch, 1, 1, seq), True where
    the key is a real token. Padding keys get -inf before the softmax, so every query gives
    them exactly zero weight and [PAD] can never leak into a real token's vector. There is no
    causal mask: every token sees every other token, left and right (BERT's bidirectionality).
    The model calls the fused equivalent, except when it trains on a CPU (BertSelfAttention).
    """
    # Scaling q, not the scores: the same product; fewer divisions when seq > head_dim.
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (batch, heads, seq, seq)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return weights @ v  # (batch, heads, seq, head_dim)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention followed by its output projection."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # Q, K and V in one matrix multiply: three separate (H, H) projections stacked into one
        # (3H, H) weight. Same numbers as three Linear layers, one kernel launch instead of three.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, hidden = x.shape
        qkv = self.qkv(x)  # (batch, seq, 3 * hidden)
        qkv = qkv.view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (batch, heads, seq, head_dim)
        dropout_p = self.attention_dropout if self.training else 0.0
        if dropout_p > 0 and x.device.type == "cpu":
            # PyTorch's fused CPU attention kernel has no dropout, so in training
            # scaled_dot_product_attention falls back to a generic path that copies q, k and v
            # and upcasts bf16 to fp32. The same math written out makes a whole bf16 training
            # step 1.14x faster (fp32: 1.03x); benchmarks/README.md has the numbers.
            context = attention_reference(q, k, v, key_padding_mask, dropout_p)
        else:
            # attention_reference in one fused kernel (flash or memory-efficient where
            # available); is_causal stays False.
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask,
                                                     dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(batch, seq, hidden)  # (batch, seq, hidden)
        return self.out(context)


class BertLayer(nn.Module):
    """One encoder layer: attention and feed-forward, each as LayerNorm(x + Dropout(f(x))).

    This is the post-LayerNorm arrangement of the original Transformer and of BERT; the
    pre-LayerNorm variant of later models would not load BERT's weights correctly.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # DistilBERT drops out of the feed-forward output only, not out of attention's.
        self.attention_output_dropout = (self.dropout if config.attention_output_dropout
                                         else nn.Identity())

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.attention_output_dropout(self.attention(x, key_padding_mask))
        x = self.attention_norm(x + attended)  # (batch, seq, hidden)
        h = self.activation(self.intermediate(x))  # (batch, seq, intermediate)
        return self.output_norm(x + self.dropout(self.output(h)))  # (batch, seq, hidden)


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the sentence vector that next-sentence prediction was trained on.

    Pre-training fed it to a 2-way classifier, "is sentence B the one that followed A?"
    (section 3.1, Task #2), so it summarises the pair in [CLS]'s vector. Fine-tuning for a
    sentence classification task starts from it (section 4.1); masked-LM never reads it.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))  # (batch, hidden)


def _key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, seq) 1/0 mask -> (batch, 1, 1, seq) bool, or None when nothing is padded.

    Returning None for a batch without padding lets scaled_dot_product_attention choose its
    fastest kernel; training blocks are always full, so this is the common case. The check
    costs one reduction over (batch, seq), nothing next to a layer.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class BertModel(nn.Module):
    """The encoder: embeddings, then num_hidden_layers BertLayers. Returns hidden states, and
    on request the pooled [CLS] vector (when built with the pooler)."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda module: init_weights(module, config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, return_pooled: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids: (batch, seq) -> last hidden states (batch, seq, hidden); with
        return_pooled, (hidden states, pooled output (batch, hidden)) as HF's pooler_output."""
        key_padding_mask = _key_padding_mask(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        if not return_pooled:
            return x
        if self.pooler is None:
            raise ValueError("return_pooled: this model was built without a pooler "
                             "(add_pooling_layer=False, as for a checkpoint that has none)")
        return x, self.pooler(x)


class MaskedLMHead(nn.Module):
    """Predicts the original token at each position (section 3.1, Task #1).

    transform (dense + GELU + LayerNorm), then a projection onto the vocabulary whose matrix
    is the word embedding matrix itself: the model reads token t through row t of E and
    predicts token t by the dot product with that same row, which saves vocab x hidden
    parameters and keeps input and output meanings of a token in one place. The bias is the
    head's own.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        # The transform ends at the width of the embeddings it is multiplied with: hidden_size,
        # or ELECTRA's embedding_size.
        self.dense = nn.Linear(config.hidden_size, config.embedding_width)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.embedding_width, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden_states (..., hidden), word_embeddings (vocab, width) -> logits (..., vocab).

        The decoder matrix is passed in rather than stored, so the tie cannot come undone and
        the state dict holds the matrix once."""
        h = self.layer_norm(self.activation(self.dense(hidden_states)))  # (..., width)
        return F.linear(h, word_embeddings, self.bias)  # (..., vocab)


class BertForMaskedLM(nn.Module):
    """BERT encoder plus the masked-LM head: logits over the vocabulary, or the MLM loss."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False):
        super().__init__()
        self.config = config
        # The MLM objective never uses the pooler (it served next-sentence prediction). A
        # checkpoint that has one keeps it (add_pooling_layer), so that a model trained here
        # and exported goes to a classifier with its pretrained pooler. It is frozen: with no
        # gradient, AdamW (weight decay included) and DDP leave it exactly as loaded.
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer)
        if self.bert.pooler is not None:
            self.bert.pooler.requires_grad_(False)
        self.mlm_head = MaskedLMHead(config)
        self.mlm_head.apply(lambda module: init_weights(module, config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                reduction: str = "mean", max_targets: int | None = None) -> torch.Tensor:
        """Without labels: logits (batch, seq, vocab). With labels (-100 = not masked): the
        cross-entropy over the masked positions, averaged ("mean") or summed ("sum").
        max_targets: at least the most targets in any row (masked_logits says why)."""
        if labels is None:
            hidden = self.bert(input_ids, attention_mask, token_type_ids)
            return self.mlm_head(hidden, self.word_embeddings)
        logits, targets = self.masked_logits(input_ids, labels, attention_mask, token_type_ids,
                                             max_targets)
        # Targets of -100 (padding of the fixed-shape path) are ignored, in "mean" too.
        return F.cross_entropy(logits.float(), targets, reduction=reduction)

    def masked_logits(self, input_ids: torch.Tensor, labels: torch.Tensor,
                      attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None,
                      max_targets: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the masked positions only: ((num_masked, vocab), targets (num_masked,)).

        Only ~15% of positions carry a label, and the vocabulary projection is the largest
        matrix multiply in the model (21% of bert-base's training FLOPs over all positions,
        most of a small model's). Gathering the masked positions first skips the other 85%.

        Two ways to gather them, the same logits and loss:
        - max_targets None: boolean indexing, hidden[labels != -100]. Its size depends on the
          data, so on a GPU the host must wait to learn it (a sync per call), and
          torch.compile has to break the graph around it.
        - max_targets k, at least the number of targets of every row (the trainer counts
          them on the CPU-side labels): the first k positions of each row in the order
          "targets first", a fixed (batch, k) shape. Rows with fewer than k targets fill up
          with unlabelled positions whose target is -100, which cross_entropy ignores. Full
          training blocks all carry exactly round(p * (seq - 2)) targets, so nothing is
          filled and nothing wasted; rows that differ (padding, whole-word masking) cost
          k - (their targets) extra head positions each.

        The contract of max_targets: k >= the most targets in any row (any larger k gives the
        same loss). A smaller k would drop each longer row's last targets, a smaller loss
        with no error, so it is checked where that is free: labels on the CPU in eager mode
        raise ValueError. Labels on a GPU, or a call under torch.compile, are not checked:
        counting there would make the host wait for the device (or break the graph), so
        the caller keeps the contract, as the trainer does by counting on the CPU-side
        labels before moving them (minibert/batches.py).
        """
        if (max_targets is not None and labels.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            most = int((labels != -100).sum(dim=1).max()) if labels.numel() else 0
            if max_targets < most:
                raise ValueError(f"max_targets {max_targets} is below the {most} targets of a "
                                 f"row: it would drop targets; pass at least {most}, or None")
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # (batch, seq, hidden)
        if max_targets is None:
            is_masked = labels != -100  # (batch, seq)
            logits = self.mlm_head(hidden[is_masked], self.word_embeddings)  # (num_masked, vocab)
            return logits, labels[is_masked]
        # A stable sort of "is not a target" puts each row's targets first, in position order.
        positions = (labels == -100).to(torch.int8).argsort(dim=1, stable=True)[:, :max_targets]
        targets = labels.gather(1, positions)  # (batch, k)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.mlm_head(picked, self.word_embeddings)  # (batch, k, vocab)
        return logits.flatten(0, 1), targets.flatten()  # (batch * k, vocab), (batch * k,)

    def logits_at(self, sequences: list[list[int]] | list[torch.Tensor],
                  positions: list[list[int]], pad_token_id: int) -> torch.Tensor:
        """Logits at chosen positions of sequences of different lengths, from one forward pass:
        (sum of len(positions[i]), vocab), the positions of sequence 0 in the order given, then
        those of sequence 1, and so on. Fill-mask and scoring read the model this way.

        The sequences (token ids: lists or 1-d tensors) are padded with pad_token_id to the
        longest, and the padding is masked out of attention, so each sequence is read as if it
        were alone. The head runs at the chosen positions only: the vocabulary projection is
        the largest matrix multiply, and its logits elsewhere would be thrown away."""
        input_ids = torch.full((len(sequences), max(map(len, sequences))), pad_token_id)
        attention_mask = torch.zeros_like(input_ids)  # (batch, seq): 1 = token, 0 = padding
        for row, ids in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.as_tensor(ids)
            attention_mask[row, :len(ids)] = 1
        device = self.word_embeddings.device
        hidden = self.bert(input_ids.to(device), attention_mask.to(device))  # (batch, seq, hidden)
        rows = [row for row, cols in enumerate(positions) for _ in cols]
        cols = [col for cols in positions for col in cols]
        return self.mlm_head(hidden[rows, cols], self.word_embeddings)  # (num_positions, vocab)

    @property
    def word_embeddings(self) -> torch.Tensor:
        """The (vocab, width) matrix shared by the input embedding and the MLM decoder."""
        return self.bert.embeddings.word_embeddings.weight


def init_weights(module: nn.Module, config: BertConfig) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, LayerNorm at identity."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=config.initializer_range)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=config.initializer_range)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
