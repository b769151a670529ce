"""Tokenizers for pretraining: a character vocabulary, a byte-level BPE trained with `tokenizers`, or a model's.

All wrap lmlab.tokenizer.Tokenizer. Pretraining data needs a document separator; a tokenizer without an
end-of-text token gets one added as a special token.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import LmlabError, first_line
from lmlab.tokenizer import Tokenizer

EOT = "<|endoftext|>"


def add_special(tok: Tokenizer, token: str) -> int:
    """The id of a special token, adding it at the end of the vocabulary when the tokenizer lacks it."""
    i = tok.tok.token_to_id(token)
    if i is None:
        tok.tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        i = tok.tok.token_to_id(token)
    return i


def with_separator(tok: Tokenizer) -> Tokenizer:
    """The tokenizer with an end-of-text id (its own eos, or <|endoftext|> added)."""
    if tok.eos_id is None:
        eos = add_special(tok, EOT)
        tok = Tokenizer(tok.tok, bos_id=tok.bos_id, eos_id=eos, pad_id=tok.pad_id if tok.pad_set else None,
                        chat_template=tok.chat_template)
    return tok


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Character vocabulary over every character of the corpus (read once, streaming), plus <|endoftext|>."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise LmlabError("corpus is empty: no characters to build a vocabulary from")
    return with_separator(Tokenizer.char_level(chars))


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              special_tokens: tuple[str, ...] = (EOT,), show_progress: bool = True) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on streamed texts; the first special token is end-of-text."""
    if vocab_size < 256 + len(special_tokens):
        raise LmlabError(f"vocab_size={vocab_size} is too small for byte-level BPE (needs ≥ {256 + len(special_tokens)})")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = False

    def counted():
        nonlocal seen
        for t in texts:
            seen = seen or bool(t.strip())
            yield t

    hf.train_from_iterator(counted(), trainer=trainer)
    if not seen:
        raise LmlabError("corpus is empty: no text to train a tokenizer on")
    eos = hf.token_to_id(special_tokens[0])
    return Tokenizer(hf, eos_id=eos, pad_id=eos)


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a folder or tokenizer.json, or the tokenizer of any lmlab model spec."""
    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        try:
            return Tokenizer(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise LmlabError(f"{path}: cannot read tokenizer ({first_line(e)})") from None
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_folder(path)
    from lmlab.checkpoints import read

    _, _, tok = read(spec)
    if tok is None:
        raise LmlabError(f"{spec}: model has no tokenizer")
    return tok
