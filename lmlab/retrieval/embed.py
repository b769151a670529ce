"""Sentence embeddings from lmlab's own encoder: the mean of the last hidden states over the real tokens
of each text, L2-normalised (what sentence-transformers computes for all-MiniLM-L6-v2)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.retrieval.base import check_texts
from lmlab.utils.progress import Progress

DEFAULT_ENCODER = "all-minilm-l6-v2"
PROGRESS_FROM = 2048  # texts: fewer than this embed without a progress display


class Embedder(Protocol):
    """What a dense index needs: a name that identifies the model, and texts → N×D unit vectors."""

    name: str

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


class SentenceEncoder:
    """Batched, length-sorted mean-pooled embeddings under inference mode; returns N×D float32 unit rows."""

    def __init__(self, model, tokenizer, *, name: str, max_length: int | None = None, batch_size: int = 64,
                 progress: bool = True, spec: str | None = None):
        if getattr(model.cfg, "arch", None) not in ("encoder", "encoder-decoder"):
            raise LmlabError(f"{name}: sentence embeddings need an encoder model, this one is "
                             f"'{getattr(model.cfg, 'arch', None)}'")
        if tokenizer is None:
            raise LmlabError(f"{name}: the model has no tokenizer")
        if batch_size < 1:
            raise LmlabError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.spec = spec  # what SentenceEncoder.load takes to get this model again (None: not loadable by spec)
        self.batch_size, self.progress = batch_size, progress
        self.progress_from = PROGRESS_FROM  # texts: fewer embed without a progress display
        self.max_length = min(max_length or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.tok = _plain_copy(tokenizer.tok, self.max_length)

    @classmethod
    def load(cls, spec: str = DEFAULT_ENCODER, *, device: str = "cpu", dtype: str = "float32",
             max_length: int | None = None, batch_size: int = 64, progress: bool = True) -> "SentenceEncoder":
        """An encoder from any model spec (a preset such as all-minilm-l6-v2, an HF folder, ...)."""
        from lmlab import hub
        from lmlab.checkpoints import load, resolve

        path = resolve(spec)
        model, tok = load(str(path), dtype=dtype, device=device)
        local = spec not in hub.SOURCES
        name = f"{Path(spec).name if local else spec}@{fingerprint(path)[:12]}"
        return cls(model, tok, name=name, max_length=max_length or _sentence_max_length(path),
                   batch_size=batch_size, progress=progress, spec=str(path.resolve()) if local else spec)

    @property
    def dim(self) -> int:
        return self.model.cfg.d_model

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts, "texts")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        ids = [e.ids for e in self.tok.encode_batch(texts)] if texts else []
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first: memory trouble shows at once
        bar = Progress(len(texts), "embedding", unit="text", enabled=self.progress and len(texts) >= self.progress_from)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            out[rows] = self._embed([ids[i] for i in rows]).numpy()
            bar.update(len(rows))
        bar.close()
        return out

    encode = __call__

    @torch.inference_mode()
    def _embed(self, batch: list[list[int]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, x in enumerate(batch):
            ids[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), 1
        ids, mask = ids.to(device), mask.to(device)
        h = self.model.encode(ids, mask, torch.zeros_like(ids)).float()
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(pooled, p=2, dim=-1).cpu()


def _plain_copy(tok, max_length: int):
    """A copy of the `tokenizers` object that truncates at max_length and never pads (a tokenizer.json may
    carry its own fixed padding and truncation, as all-MiniLM-L6-v2's does: 128)."""
    from tokenizers import Tokenizer as HFTokenizer

    copy = HFTokenizer.from_str(tok.to_str())
    copy.no_padding()
    copy.enable_truncation(max_length)
    return copy


def _sentence_max_length(path: Path) -> int | None:
    """sentence-transformers' max_seq_length for the folder (256 for all-MiniLM-L6-v2), if it says one."""
    conf = path / "sentence_bert_config.json"
    if not conf.is_file():
        return None
    try:
        value = json.loads(conf.read_text()).get("max_seq_length")
    except (json.JSONDecodeError, AttributeError):
        raise LmlabError(f"{conf}: not a JSON object") from None
    if value is not None and (not isinstance(value, int) or value < 1):
        raise LmlabError(f"{conf}: max_seq_length should be a positive integer, got {value!r}")
    return value


def fingerprint(path: Path) -> str:
    """sha256 identifying a model's weights: the checksum hub recorded for a preset folder, else the hash
    of its weight file(s)."""
    from lmlab import hub

    record = path / hub.SOURCE_RECORD
    if path.is_dir() and record.is_file():
        try:
            return str(json.loads(record.read_text())["sha256"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LmlabError(f"{record}: not a valid source record") from None
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise LmlabError(f"{path}: no weight files to identify the model by")
    h = hashlib.sha256()
    for f in files:
        h.update(hub.sha256_of(f).encode())
    return h.hexdigest()
