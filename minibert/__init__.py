"""minibert: a minimal, from-scratch BERT in plain PyTorch.

    model = minibert.load_pretrained("path/to/checkpoint")   # minibert or HuggingFace folder
    tokenizer = minibert.load_tokenizer("path/to/checkpoint")
    logits = model(input_ids, attention_mask)                 # (batch, seq, vocab)
    minibert.fill_mask(model, tokenizer, "Paris is the [MASK] of France.")
"""

from .checkpoint import load_pretrained, save_pretrained
from .errors import MinibertError
from .fill_mask import fill_mask, fill_masks
from .model import BertConfig, BertForMaskedLM, BertModel
from .tokenizer import load_tokenizer

__all__ = ["BertConfig", "BertModel", "BertForMaskedLM", "load_pretrained", "save_pretrained",
           "load_tokenizer", "fill_mask", "fill_masks", "MinibertError"]
