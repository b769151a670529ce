"""Instruction-tuning data: Alpaca JSON and chat jsonl, rendered with the model's chat template, with the
loss on the assistant's responses only.

The response span is found by rendering the conversation prefix by prefix (no `{% generation %}`
markers needed): for the k-th message, an assistant turn,

    before = render(messages[:k], add_generation_prompt=True)   # everything up to the answer
    upto   = render(messages[:k+1])                               # … and the answer with its end marker

`upto` must extend `before` (and the whole conversation must extend `upto`); the supervised text is
`upto[len(before):]` from where the message's content starts (so a role header that a template
without a generation prompt writes itself stays unsupervised) to its end, end-of-turn marker
included, so the model learns to stop. Tokens are mapped to characters through the tokenizer's
offsets; a token is supervised when it starts inside a span.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError, first_line
from lmlab.eval.data import read_json, read_jsonl

IGNORE = -100
ROLES = ("system", "user", "assistant")
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # labels[t] = the target of position t (ids[t+1]) or IGNORE


# --------------------------------------------------------------------------- reading
def load_alpaca(path: str | Path, system: str = "") -> list[list[dict]]:
    """Conversations from Alpaca JSON: [{instruction, input, output}] → user (instruction, then the input
    after a blank line when there is one) and assistant (output); an optional system message first.
    Read by lmlab.eval.data.read_json (a JSON list, an object holding one list, or JSON lines)."""
    out = []
    for i, rec in enumerate(read_json(path).docs):
        for key in ("instruction", "input", "output"):
            if key not in rec:
                raise LmlabError(f"{path}: record {i}: missing field '{key}'")
            if not isinstance(rec[key], str):
                raise LmlabError(f"{path}: record {i}: field '{key}' should be a string, got {rec[key]!r}")
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"].strip() else "")
        conv = [{"role": "system", "content": system}] if system else []
        out.append(conv + [{"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}])
    if not out:
        raise LmlabError(f"{path}: no records")
    return out


def check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise LmlabError(f"{where}: 'messages' should be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LmlabError(f"{where}: message {j} should be {{role: {'|'.join(ROLES)}, content: string}}, got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise LmlabError(f"{where}: no assistant message (nothing to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_chat(path: str | Path) -> list[list[dict]]:
    """Conversations from chat jsonl: one {"messages": [{role, content}, ...]} per line."""
    data = read_jsonl(path)
    out = []
    for rec, origin in zip(data.docs, data.origins):
        if "messages" not in rec:
            raise LmlabError(f"{origin}: missing field 'messages'")
        out.append(check_messages(rec["messages"], origin))
    if not out:
        raise LmlabError(f"{path}: no conversations")
    return out


def load_conversations(path: str | Path, fmt: str = "auto", system: str = "") -> list[list[dict]]:
    """Alpaca (.json) or chat (.jsonl) by `fmt` or, with 'auto', by the file's suffix."""
    if fmt == "auto":
        fmt = "chat" if Path(path).suffix == ".jsonl" else "alpaca"
    if fmt == "alpaca":
        return load_alpaca(path, system)
    if fmt == "chat":
        return load_chat(path)
    raise LmlabError(f"instruction data format '{fmt}' is not one of auto, alpaca, chat")


# --------------------------------------------------------------------------- rendering
def for_rendering(tokenizer):
    """The tokenizer with `{% generation %}` markers removed from its template (they only mark spans,
    which lmlab finds itself; plain Jinja does not know the tag)."""
    if not tokenizer.chat_template or not _GENERATION_TAG.search(tokenizer.chat_template):
        return tokenizer
    tok = copy.copy(tokenizer)
    tok.chat_template = _GENERATION_TAG.sub("", tokenizer.chat_template)
    return tok


def response_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, character spans of the assistant responses to supervise)."""
    render = tokenizer.apply_chat_template
    text = render(messages, add_generation_prompt=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:k], add_generation_prompt=True) if k else ""
        upto = render(messages[:k + 1], add_generation_prompt=False)
        if not upto.startswith(before) or not text.startswith(upto):
            raise LmlabError(f"the chat template does not render message {k} as an extension of the messages before "
                             "it; lmlab cannot find the response span")
        start = len(before) + _content_start(render, messages[:k], upto[len(before):], m["content"])
        spans.append((start, len(upto)))
    return text, spans


def _content_start(render, history: list[dict], turn: str, content: str) -> int:
    """Where the content starts in the rendered turn: after any role header the template writes (the
    header is what the turn shares with the same turn rendered with empty content)."""
    content = content.strip()
    if not content:
        return 0
    empty = render([*history, {"role": "assistant", "content": ""}], add_generation_prompt=False)
    before = render(history, add_generation_prompt=True) if history else ""
    empty_turn = empty[len(before):]
    shared = next((i for i, (a, b) in enumerate(zip(turn, empty_turn)) if a != b), min(len(turn), len(empty_turn)))
    at = turn.rfind(content, 0, shared + len(content))
    return at if at >= 0 else 0


def encode_example(tokenizer, messages: list[dict], max_len: int = 0) -> Example:
    """Token ids of the rendered conversation and next-token labels that are IGNORE outside the responses."""
    text, spans = response_spans(tokenizer, messages)
    try:
        enc = tokenizer.tok.encode(text, add_special_tokens=False)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise LmlabError(f"the tokenizer cannot encode the conversation ({first_line(e)})") from None
    ids, offsets = list(enc.ids), enc.offsets
    inside = [any(a <= s < b for a, b in spans) for s, _ in offsets]
    labels = [ids[t + 1] if inside[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    if max_len:
        ids, labels = ids[:max_len], labels[:max_len]
        labels[-1] = IGNORE  # its target was cut off
    return Example(ids, labels)


def encode_all(tokenizer, conversations: list[list[dict]], max_len: int = 0, source: str = "data",
               drop_unsupervised: bool = False) -> list[Example]:
    """Every conversation encoded; one whose responses all lie past max_len tokens is an LmlabError, or
    (drop_unsupervised) left out: an error only when none is left."""
    tokenizer = for_rendering(tokenizer)
    out = []
    for i, conv in enumerate(conversations):
        try:
            ex = encode_example(tokenizer, conv, max_len)
        except LmlabError as e:
            raise LmlabError(f"{source}: conversation {i}: {e}") from None
        if all(t == IGNORE for t in ex.labels):
            if drop_unsupervised:
                continue
            raise LmlabError(f"{source}: conversation {i} has no response tokens within {max_len} tokens "
                             "(raise seq_len)")
        out.append(ex)
    if not out:
        raise LmlabError(f"{source}: no conversation has response tokens within {max_len} tokens (raise seq_len)")
    return out
