"""Chapter 3's numbers: how HuggingFace BERT weights become minibert weights, and the check.

    python docs/examples/weight_names.py                 # assets at ../shared/assets
    python docs/examples/weight_names.py --assets PATH --no-parity

It runs minibert.convert.hf_to_minibert on the two real checkpoints in the shared assets and
prints which HuggingFace tensor became which minibert tensor. The pairs are found from the
tensors themselves (a renamed tensor is the same object; Q, K and V are found as the three
row blocks of qkv), not from a list written down here. The last part loads the same weights
in transformers and in minibert and compares their outputs on a padded batch, which is what
tests/test_convert.py does on more shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from minibert import load_tokenizer
from minibert.checkpoint import read_checkpoint
from minibert.convert import hf_to_minibert

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # for convert_weights.py, a script at the repository's root
from convert_weights import ConvertArgs, convert  # noqa: E402
SENTENCES = ["Weights keep their values; only their names change.", "Hello [MASK]!"]


def name_pairs(hf_state: dict, state: dict) -> list[tuple[str, str, tuple]]:
    """(HuggingFace name, minibert name, shape in HuggingFace) for every converted tensor."""
    pairs = []
    for hf_name, hf_tensor in hf_state.items():
        for name, tensor in state.items():
            if tensor is hf_tensor or (tensor.shape == hf_tensor.shape
                                       and torch.equal(tensor, hf_tensor)):
                pairs.append((hf_name, name, tuple(hf_tensor.shape)))
            elif name.endswith(("qkv.weight", "qkv.bias")):
                hidden = tensor.shape[0] // 3
                for index, block in enumerate(("query", "key", "value")):
                    rows = slice(index * hidden, (index + 1) * hidden)
                    if (f"self.{block}." in hf_name and hf_tensor.shape == tensor[rows].shape
                            and torch.equal(hf_tensor, tensor[rows])):
                        pairs.append((hf_name, f"{name}[{rows.start}:{rows.stop}]",
                                      tuple(hf_tensor.shape)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--no-parity", action="store_true",
                        help="skip the comparison with transformers (it takes a few seconds)")
    args = parser.parse_args()
    tiny = (args.assets / "checkpoints" / "bert-tiny-splade-mlm").resolve()
    minilm = (args.assets / "checkpoints" / "minilm-l6-h384-uncased").resolve()

    print("== bert-tiny-splade-mlm (BertForMaskedLM) ==")
    hf_state = load_file(tiny / "model.safetensors")
    state, notices = hf_to_minibert(hf_state)
    print(f"HuggingFace tensors: {len(hf_state)}; minibert tensors: {len(state)}; "
          f"notices: {len(notices)}")
    print(f"decoder matrix stored in the file: {'cls.predictions.decoder.weight' in hf_state}")
    pairs = name_pairs(hf_state, state)
    print(f"every HuggingFace tensor accounted for: {len({p[0] for p in pairs}) == len(hf_state)}")
    width = max(len(hf_name) for hf_name, _, _ in pairs)
    for hf_name, name, shape in pairs:
        if ".layer.1." not in hf_name:  # layer 1 repeats layer 0 with another index
            print(f"  {hf_name:<{width}}  ->  {name}  {shape}")
    print(f"qkv weight of layer 0: {tuple(state['bert.layers.0.attention.qkv.weight'].shape)}")

    print("== minilm-l6-h384-uncased (BertModel) ==")
    hf_state = load_file(minilm / "model.safetensors")
    state, _ = hf_to_minibert(hf_state)
    print(f"HuggingFace tensors: {len(hf_state)}; minibert tensors: {len(state)}")
    print(f"  index buffers (skipped): {sum(k.endswith('position_ids') for k in hf_state)}; "
          f"pooler tensors (kept): {sum(k.startswith('pooler.') for k in hf_state)}; "
          f"masked-LM head tensors: {sum(k.startswith('cls.') for k in hf_state)}")

    print("== convert_weights.py on both ==")
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # so that the output names the folders as the commands do
        for folder, dst in ((tiny, "out/bert-tiny"), (minilm, "out/minilm")):
            print(f"$ python convert_weights.py ../shared/assets/checkpoints/{folder.name} {dst}")
            convert(ConvertArgs(src=str(folder), dst=Path(dst)))
        print()  # the commands' output ends here (tests/test_docs_commands.py reads it so)
        files = sorted(p.name for p in Path("out/bert-tiny").iterdir())
        config = json.loads(Path("out/bert-tiny/config.json").read_text())
        print(f"out/bert-tiny holds: {', '.join(files)}")
        print(f'config.json: "model_type": "{config["model_type"]}", then the BertConfig fields')
        mini_state = load_file("out/bert-tiny/model.safetensors")
        print(f"model.safetensors: {len(mini_state)} tensors, minibert names, "
              f"no decoder: {not any('decoder' in k for k in mini_state)}")
        os.chdir(here)

    if args.no_parity:
        return
    print("== parity with transformers on the same weights ==")
    import transformers  # only here: minibert itself never imports it

    transformers.logging.set_verbosity_error()
    for folder, reference_class in ((tiny, transformers.BertForMaskedLM),
                                    (minilm, transformers.BertModel)):
        ours, _, _ = read_checkpoint(folder)
        reference = reference_class.from_pretrained(str(folder)).eval()
        tokenizer = load_tokenizer(folder)
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"))
        batch = tokenizer.encode_batch(SENTENCES)
        ids = torch.tensor([e.ids for e in batch])
        mask = torch.tensor([e.attention_mask for e in batch])
        with torch.no_grad():
            out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            diffs = {"hidden states": (ours.bert(ids, mask) - out.hidden_states[-1]).abs().max()}
            if hasattr(out, "logits"):
                diffs["logits"] = (ours(ids, mask) - out.logits).abs().max()
        for what, diff in diffs.items():
            print(f"{folder.name}: {what} {tuple(ids.shape)} batch, padded, "
                  f"max difference below 1e-4: {diff.item() < 1e-4}")


if __name__ == "__main__":
    main()
