"""HF-format folders (config.json + safetensors + tokenizer.json): read, export, and name maps.

    base.py      what a family is made of (name-map entries, typed config.json access, Family)
    llama.py gpt2.py bert.py t5.py   one module per family: its name map and its own steps
    mixtral.py qwen2_moe.py          MoE families (experts.py: one MoE block's map); llama.py holds
                                     mistral too (window.py: sliding windows in HF configs)
    families.py  the registry (model_type → Family) and the choice of family for export
    reader.py    folder → (ModelConfig, lmlab state dict, tokenizer)
    writer.py    model → folder transformers loads
    names.py     lmlab names ↔ HF names (fused q/k/v and gate/up as row slices), e.g. for adapters
"""
from lmlab.checkpoints.hf.base import Entry, Family
from lmlab.checkpoints.hf.families import FAMILIES, export_family, family_of
from lmlab.checkpoints.hf.names import NamePiece, from_hf, name_pieces, to_hf
from lmlab.checkpoints.hf.reader import INDEX_NAME, WEIGHTS_NAME, expected_shapes, read
from lmlab.checkpoints.hf.writer import export, hf_state_dict

__all__ = ["Entry", "FAMILIES", "Family", "INDEX_NAME", "NamePiece", "WEIGHTS_NAME", "expected_shapes", "export",
           "export_family", "family_of", "from_hf", "hf_state_dict", "name_pieces", "read", "to_hf"]
