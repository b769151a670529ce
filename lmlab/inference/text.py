"""Text in, text out, streamed: the text-level API over the decoding loop (lmlab.inference.generate).

  IncrementalDetokenizer   token ids → text pieces, holding back incomplete UTF-8 characters
  StopFilter               text pieces → text safe to show, cut before the first stop string
  generate / generate_from_ids / chat_turn   what `lmlab generate`, `lmlab chat` and eval call
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lmlab.inference.drafting import Speculation
from lmlab.inference.generate import FinishReason, Timing, generate_tokens
from lmlab.inference.sampling import GenerationConfig
from lmlab.inference.speculative import SpecStats


@dataclass
class Completion:
    text: str  # the new text, cut before a stop string
    token_ids: list[int]  # new tokens (through the one that completed a stop string; never the eos id)
    prompt_tokens: int
    finish_reason: FinishReason
    timing: Timing
    spec: SpecStats | None = None  # the batch's speculation statistics (shared by its rows)


class IncrementalDetokenizer:
    """Token ids in, text pieces out, so that the pieces always join to tokenizer.decode(all ids).

    Each push decodes only a short window: the last token already shown (as context, so decoders that
    strip or add a leading space behave as in a full decode) plus the tokens since. A window whose text
    ends in U+FFFD may be a multi-byte character split across byte-level tokens, so its tail is held back
    until a later token completes it (or flush() gives up on it).
    """

    MAX_WINDOW = 32  # a held-back tail this long is garbage bytes, not a character: show it

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.start = 0  # first id of the window
        self.shown = 0  # characters of decode(window) already returned

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode()
        complete = not text.endswith("\ufffd") or len(self.ids) - self.start >= self.MAX_WINDOW
        stable = text if complete else text.rstrip("\ufffd")
        piece = stable[self.shown:]
        self.shown = max(self.shown, len(stable))
        if complete:  # slide the window: keep only the last token as context
            self.start = len(self.ids) - 1
            self.shown = len(self._decode())
        return piece

    def flush(self) -> str:
        """Whatever is still held back (e.g. an unfinished character at the very end)."""
        piece = self._decode()[self.shown:]
        self.start, self.shown = len(self.ids), 0
        return piece


class StopFilter:
    """Passes text through until a stop string appears; never lets out any part of a stop string.

    The tail that could still grow into a stop string is held back; the search only looks at that
    held-back tail plus the new piece, so the work per piece does not grow with the text.
    """

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text safe to show now. After a stop string is found, `stopped` is True and nothing more passes."""
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)]
        hold = self._partial_stop_len(text)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        piece, self.pending = ("" if self.stopped else self.pending), ""
        return piece


def generate_from_ids(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, *,
                      on_text: Callable[[int, str], None] | None = None,
                      speculation: Speculation | None = None) -> list[Completion]:
    """Like generate(), for prompts that are already token ids (e.g. a rendered chat template).
    `model`: a Transformer or a Runner (lmlab.inference.runner); `speculation`: see generate_tokens."""
    detoks = [IncrementalDetokenizer(tokenizer) for _ in prompts]
    filters = [StopFilter(cfg.stop) for _ in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]

    def emit(row: int, text: str) -> None:
        if text:
            pieces[row].append(text)
            if on_text is not None:
                on_text(row, text)

    def on_token(row: int, token_id: int) -> bool:
        emit(row, filters[row].feed(detoks[row].push(token_id)))
        return filters[row].stopped

    result = generate_tokens(model, prompts, cfg, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                             on_token=on_token, speculation=speculation)
    completions = []
    for row, prompt in enumerate(prompts):
        reason = result.finish_reasons[row]
        if reason != "stop":  # the held-back tail may still contain a stop string
            emit(row, filters[row].feed(detoks[row].flush()))
            emit(row, filters[row].flush())
            if filters[row].stopped:
                reason = "stop"
        completions.append(Completion(text="".join(pieces[row]), token_ids=result.tokens[row],
                                      prompt_tokens=len(prompt), finish_reason=reason, timing=result.timing,
                                      spec=result.spec))
    return completions


def generate(model, tokenizer, prompts: list[str], cfg: GenerationConfig, *,
             on_text: Callable[[int, str], None] | None = None,
             speculation: Speculation | None = None) -> list[Completion]:
    """Continue every prompt (one batch); on_text(row, piece) streams each row's new text as it appears."""
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    return generate_from_ids(model, tokenizer, ids, cfg, on_text=on_text, speculation=speculation)


def chat_turn(model, tokenizer, messages: list[dict[str, str]], cfg: GenerationConfig,
              on_text: Callable[[str], None] | None = None, speculation: Speculation | None = None) -> str:
    """The assistant's reply to `messages` ([{"role": ..., "content": ...}]); on_text(piece) streams it."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)  # the template already holds any BOS
    stream = None if on_text is None else (lambda row, piece: on_text(piece))
    return generate_from_ids(model, tokenizer, [ids], cfg, on_text=stream, speculation=speculation)[0].text
