"""Tokenizers: from an HF tokenizer.json, from GGUF metadata, or character-level; plus chat templates."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

from lmlab.config import read_json
from lmlab.errors import LmlabError, first_line
from lmlab.utils.atomic import write_json, write_text

# Pre-tokenizer split patterns that llama.cpp names in `tokenizer.ggml.pre`.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_after(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


GGUF_PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": lambda: _byte_level_after(_LLAMA3_PATTERN),
    "qwen2": lambda: _byte_level_after(_QWEN2_PATTERN),
}


def _check_gguf_tokenizer(meta: dict[str, Any], source: str) -> None:
    """Types of the GGUF tokenizer metadata, and every special id inside the token list."""
    def bad(key: str, what: str, allowed: str) -> LmlabError:
        return LmlabError(f"{source}: {key}: {what} ({allowed})")

    for key, required in (("tokenizer.ggml.tokens", True), ("tokenizer.ggml.merges", True)):
        value = meta.get(key)
        if value is None and required:
            raise LmlabError(f"{source}: GGUF metadata lacks '{key}'")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(key, f"{type(value).__name__} is not a list of strings", "allowed: an array of strings")
    if not meta["tokenizer.ggml.tokens"]:
        raise bad("tokenizer.ggml.tokens", "empty", "allowed: at least one token")
    n = len(meta["tokenizer.ggml.tokens"])
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, list) or len(types) != n
                              or not all(isinstance(t, int) for t in types)):
        raise bad("tokenizer.ggml.token_type", "not one integer per token", f"allowed: {n} integers")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n):
            raise bad(f"tokenizer.ggml.{key}", f"{value!r} is outside the vocabulary", f"allowed: 0..{n - 1}")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise bad("tokenizer.chat_template", f"{type(template).__name__} is not a string", "allowed: a string")


def _json_object(path: Path) -> dict[str, Any]:
    """An optional JSON object file beside tokenizer.json ({} when absent); bad content is named."""
    if not path.is_file():
        return {}
    d = read_json(path)
    if not isinstance(d, dict):
        raise LmlabError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmlabError(f"{path}: not UTF-8 text (byte {e.start})") from None


class Tokenizer:
    """Text ↔ ids around a `tokenizers.Tokenizer`, with the special ids and chat template a model needs."""

    def __init__(self, tok: HFTokenizer, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, chat_template: str | None = None, extra_eos: list[int] | None = None):
        self.tok = tok
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.pad_set = pad_id is not None  # False: pad_id above is a stand-in (eos, else 0), not the tokenizer's
        self.chat_template = chat_template
        self.stop_ids = sorted({i for i in [eos_id, *(extra_eos or [])] if i is not None})

    # -- construction
    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise LmlabError(f"{folder}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise LmlabError(f"{path}: cannot read tokenizer ({first_line(e)})") from None
        conf = _json_object(folder / "tokenizer_config.json")
        special = _json_object(folder / "special_tokens_map.json")

        def token_id(key: str) -> int | None:
            value = conf.get(key) or special.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        eos = token_id("eos_token")
        template = conf.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = _text(folder / "chat_template.jinja")
        if template is not None and not isinstance(template, str):  # (lists of named templates: not supported)
            raise LmlabError(f"{folder / 'tokenizer_config.json'}: chat_template: {type(template).__name__} "
                             "is not a string (allowed: one Jinja template string)")
        extra = [tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")
                 if template and tok.token_to_id(t) is not None]
        return cls(tok, bos_id=token_id("bos_token"), eos_id=eos, pad_id=token_id("pad_token"),
                   chat_template=template, extra_eos=extra)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str = "gguf") -> "Tokenizer":
        _check_gguf_tokenizer(meta, source)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise LmlabError(f"{source}: unsupported GGUF tokenizer model {kind!r} (supported: gpt2-style BPE)")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str) or pre not in GGUF_PRE_TOKENIZERS:
            raise LmlabError(f"{source}: unsupported GGUF pre-tokenizer {pre!r} "
                             f"(supported: {', '.join(GGUF_PRE_TOKENIZERS)})")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
        if bad is not None:
            raise LmlabError(f"{source}: tokenizer.ggml.merges[{bad}]: {' '.join(merges[bad])!r} is not "
                             "two tokens separated by a space")
        vocab = {t: i for i, t in enumerate(tokens)}
        try:
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        except Exception as e:  # the tokenizers library raises plain Exceptions (a merge of unknown tokens)
            raise LmlabError(f"{source}: tokenizer.ggml.merges: {first_line(e)}") from None
        tok.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
        tok.add_special_tokens(specials)
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
        template = meta.get("tokenizer.chat_template")
        extra = [vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if template and t in vocab]
        return cls(tok, bos_id=bos, eos_id=eos, pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                   chat_template=template, extra_eos=extra)

    @classmethod
    def char_level(cls, text: Iterable[str]) -> "Tokenizer":
        """A character vocabulary over the characters of `text` (nanoGPT's Shakespeare tokenizer)."""
        chars = sorted(set(text))
        vocab = {c: i for i, c in enumerate(chars)}
        tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines too
        tok.decoder = decoders.Fuse()
        return cls(tok)

    # -- use
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise LmlabError("this model has no chat template; use `lmlab generate` with a plain prompt")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.token(self.bos_id) if self.bos_id is not None else "",
                eos_token=self.token(self.eos_id) if self.eos_id is not None else "")
        except TemplateError as e:
            raise LmlabError(f"chat template: {first_line(e)}") from None

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (HF layout)."""
        folder = Path(folder)
        write_text(folder / "tokenizer.json", self.tok.to_str(pretty=True))
        conf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None:
                conf[key] = self.token(i)
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        write_json(folder / "tokenizer_config.json", conf)
