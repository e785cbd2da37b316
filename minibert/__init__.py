"""minibert: a minimal, from-scratch BERT in plain PyTorch.

    model = minibert.load_pretrained("path/to/checkpoint")   # minibert or HuggingFace folder
    tokenizer = minibert.load_tokenizer("path/to/checkpoint")
    logits = model(input_ids, attention_mask)                 # (batch, seq, vocab)

    from minibert.fill_mask import fill_mask     # also: python -m minibert.fill_mask --model DIR TEXT
    fill_mask(model, tokenizer, "Paris is the [MASK] of France.", top_k=5)

fill_mask is not re-exported here: the package attribute would shadow the module that
`python -m minibert.fill_mask` runs.
"""

from .checkpoint import load_pretrained, save_pretrained
from .errors import MinibertError
from .model import BertConfig, BertForMaskedLM, BertModel
from .tokenizer import load_tokenizer

__all__ = ["BertConfig", "BertModel", "BertForMaskedLM", "load_pretrained", "save_pretrained",
           "load_tokenizer", "MinibertError"]
