"""Text generation for every lmlab model: sampling, batched decoding with a KV cache, streaming, stop strings.

Read top to bottom:
  GenerationConfig         what to generate (length, temperature, top-k/top-p, repetition penalty, stops)
  logits processing        repetition penalty → temperature → top-k → top-p → sample (or argmax)
  generate_tokens          the token loop: one prefill pass over the (left-padded) prompts, then one
                           forward pass of one token per row per step through the model's KV cache
  IncrementalDetokenizer   token ids → text pieces, holding back incomplete UTF-8 characters
  StopFilter               text pieces → text safe to show, cut before the first stop string
  generate / chat_turn     the text-level API the CLI calls

Decoder-only models get LEFT padding, so that every row's last prompt token sits in the same (last) slot
and every new token is written to the same slot for all rows; the cache keeps each row's own positions
and marks padding slots invalid. Encoder-decoder models send the prompts (right-padded) to the encoder and
start every decoder row from the model's decoder_start_id. A finished row keeps riding along in the
batch with a masked-out pad token, so it changes nothing and costs nothing but its share of the matmul.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from lmlab import runtime
from lmlab.errors import LmlabError

FinishReason = Literal["eos", "stop", "length"]


# --------------------------------------------------------------------------- configuration
@dataclass
class GenerationConfig:
    """How to continue a prompt. Every knob at its default leaves the distribution untouched."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1 = off
    repetition_penalty: float = 1.0  # >1 discourages every token already in prompt or output; 1 = off
    stop: list[str] = field(default_factory=list)  # the text is cut before the first of these
    seed: int | None = None  # None = a fresh random seed each call
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks: exact lengths)

    def __post_init__(self) -> None:
        def bad(name: str, value: object, rule: str) -> LmlabError:
            return LmlabError(f"generation config: {name}={value!r} is invalid ({rule})")

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be >= 0; 0 means greedy")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be an integer >= 0; 0 means off")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "must be in (0, 1]; 1 means off")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be > 0; 1 means off")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", s, "stop strings must be non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", self.seed, "must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Timing:
    """Wall-clock time of one batched call (shared by every row of that batch)."""

    prefill_s: float  # the prompt pass, up to the first token's logits
    decode_s: float  # every step after that
    decode_tokens: int  # new tokens produced by the whole batch

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class TokenResult:
    tokens: list[list[int]]  # new tokens per row, without the prompt and without the stop id
    finish_reasons: list[FinishReason]
    timing: Timing


@dataclass
class Completion:
    text: str  # the new text, cut before a stop string
    token_ids: list[int]  # new tokens (through the one that completed a stop string; never the eos id)
    prompt_tokens: int
    finish_reason: FinishReason
    timing: Timing


# --------------------------------------------------------------------------- logits processing
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL/HF rule for every seen token: positive logits are divided by `penalty`, negative ones multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the row's k-th largest to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p (always at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row from B×V float logits."""
    if seen is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------- the token loop
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pad(rows: list[list[int]], pad_id: int, *, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged rows into ids and a 0/1 mask (B×T), padding on the left or the right."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def token_budgets(model_cfg, prompts: list[list[int]], max_new_tokens: int) -> list[int]:
    """New tokens each row may produce: max_new_tokens, clamped so prompt + output fits the context window."""
    context = model_cfg.max_seq_len
    budgets = []
    for i, p in enumerate(prompts):
        if not p:
            raise LmlabError(f"prompt {i} is empty (0 tokens)")
        if len(p) > context:
            raise LmlabError(f"prompt has {len(p)} tokens; the model's context window is {context}")
        if model_cfg.arch == "encoder-decoder":  # the prompt goes to the encoder; the decoder has its own window
            budgets.append(min(max_new_tokens, context - 1))
        else:
            budgets.append(min(max_new_tokens, context - len(p)))
    return budgets


def _generator(cfg: GenerationConfig, device: torch.device) -> torch.Generator | None:
    if cfg.greedy:
        return None
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)
    return gen


def _prefill(model, prompts: list[list[int]], pad_id: int, steps: int, device):
    """Run the prompts once; return the cache and the logits that choose each row's first new token."""
    B = len(prompts)
    if model.cfg.arch == "encoder-decoder":
        src, src_mask = _pad(prompts, pad_id, left=False, device=device)
        start = model.cfg.decoder_start_id if model.cfg.decoder_start_id is not None else pad_id
        cache = model.make_cache(B, steps)
        first = torch.full((B, 1), start, dtype=torch.long, device=device)
        logits = model(first, encoder_input_ids=src, encoder_mask=src_mask, cache=cache)
    else:
        ids, mask = _pad(prompts, pad_id, left=True, device=device)
        cache = model.make_cache(B, ids.shape[1] + steps)
        logits = model(ids, attention_mask=mask, cache=cache, last_logits_only=True)  # skip unused positions
    return cache, logits[:, -1].float()


def generate_tokens(model, prompts: list[list[int]], cfg: GenerationConfig, *, stop_ids: list[int], pad_id: int,
                    on_token: Callable[[int, int], bool | None] | None = None) -> TokenResult:
    """Generate new tokens for every prompt in one batch.

    A row ends at one of `stop_ids` (not included; finish "eos"), at its token budget ("length"), or when
    on_token(row, token_id) returns True ("stop"; the token is included). on_token is called once per kept
    token, in order.
    """
    if not prompts:
        return TokenResult([], [], Timing(0.0, 0.0, 0))
    if model.cfg.arch == "encoder":
        raise LmlabError("an encoder-only model cannot generate text; use a decoder or encoder-decoder model")
    budgets = token_budgets(model.cfg, prompts, cfg.max_new_tokens)
    B, steps, device = len(prompts), max(budgets), _device(model)
    stops = set() if cfg.ignore_eos else set(stop_ids)
    tokens: list[list[int]] = [[] for _ in range(B)]
    finish: list[FinishReason | None] = ["length" if b == 0 else None for b in budgets]
    if steps == 0:
        return TokenResult(tokens, finish, Timing(0.0, 0.0, 0))

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            generator = _generator(cfg, device)
            seen = None
            if cfg.repetition_penalty != 1.0:
                seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
                for i, p in enumerate(prompts):
                    seen[i, torch.tensor(p, device=device)] = True
            t0 = time.perf_counter()
            cache, logits = _prefill(model, prompts, pad_id, steps, device)
            _sync(device)
            t1 = time.perf_counter()
            rows = torch.arange(B, device=device)
            for step in range(steps):
                next_ids = sample_next(logits, cfg, generator, seen)
                if seen is not None:
                    seen[rows, next_ids] = True
                for row, tok in enumerate(next_ids.tolist()):
                    if finish[row] is not None:
                        continue
                    if tok in stops:
                        finish[row] = "eos"
                        continue
                    tokens[row].append(tok)
                    if on_token is not None and on_token(row, tok):
                        finish[row] = "stop"
                    elif len(tokens[row]) >= budgets[row]:
                        finish[row] = "length"
                if all(f is not None for f in finish):
                    break
                active = torch.tensor([f is None for f in finish], device=device)
                feed = torch.where(active, next_ids, torch.full_like(next_ids, pad_id))
                logits = runtime.step(model, feed[:, None], cache, attention_mask=active[:, None])[:, -1].float()
            _sync(device)
            t2 = time.perf_counter()
    finally:
        model.train(was_training)
    timing = Timing(prefill_s=t1 - t0, decode_s=t2 - t1, decode_tokens=sum(len(t) for t in tokens))
    return TokenResult(tokens, [f or "length" for f in finish], timing)


def generate_ids(model, prompts: list[list[int]], cfg: GenerationConfig, *, stop_ids: list[int], pad_id: int,
                 on_token: Callable[[int, int], bool | None] | None = None) -> list[list[int]]:
    """New token ids per row (without the prompt, without the stop id). See generate_tokens."""
    return generate_tokens(model, prompts, cfg, stop_ids=stop_ids, pad_id=pad_id, on_token=on_token).tokens


# --------------------------------------------------------------------------- streaming text
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


# --------------------------------------------------------------------------- text-level API
def generate_from_ids(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig, *,
                      on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Like generate(), for prompts that are already token ids (e.g. a rendered chat template)."""
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
                             on_token=on_token)
    completions = []
    for row, prompt in enumerate(prompts):
        reason = result.finish_reasons[row]
        if reason != "stop":  # the held-back tail may still contain a stop string
            emit(row, filters[row].feed(detoks[row].flush()))
            emit(row, filters[row].flush())
            if filters[row].stopped:
                reason = "stop"
        completions.append(Completion(text="".join(pieces[row]), token_ids=result.tokens[row],
                                      prompt_tokens=len(prompt), finish_reason=reason, timing=result.timing))
    return completions


def generate(model, tokenizer, prompts: list[str], cfg: GenerationConfig, *,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Continue every prompt (one batch); on_text(row, piece) streams each row's new text as it appears."""
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    return generate_from_ids(model, tokenizer, ids, cfg, on_text=on_text)


def chat_turn(model, tokenizer, messages: list[dict[str, str]], cfg: GenerationConfig,
              on_text: Callable[[str], None] | None = None) -> str:
    """The assistant's reply to `messages` ([{"role": ..., "content": ...}]); on_text(piece) streams it."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)  # the template already holds any BOS
    stream = None if on_text is None else (lambda row, piece: on_text(piece))
    return generate_from_ids(model, tokenizer, [ids], cfg, on_text=stream)[0].text
