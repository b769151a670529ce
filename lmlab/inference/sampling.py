"""Choosing the next token, in separate steps that speculative decoding can take apart:

    logits ─ process_logits ─▶ processed logits ─ probabilities ─▶ p ─ draw ─▶ token
            (repetition penalty, temperature,       (softmax; one-hot      (multinomial)
             top-k, top-p)                            when greedy)
next_token composes them (greedy: the argmax of the processed logits, no softmax at all).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError


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
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise bad("seed", self.seed, "must be an integer from 0 to 2**64-1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --------------------------------------------------------------------------- processors
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


def process_logits(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """B×V float logits → the logits whose softmax is the sampling distribution (greedy: only the
    repetition penalty applies; temperature and filters cannot change an argmax)."""
    if seen is not None and cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return logits


def probabilities(processed: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """The distribution tokens are drawn from (B×V): softmax of processed logits; greedy: one-hot argmax."""
    if cfg.greedy:
        return F.one_hot(processed.argmax(-1), processed.shape[-1]).to(processed.dtype)
    return F.softmax(processed, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from B×V probabilities."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def next_token(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None,
               seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row from B×V float logits."""
    processed = process_logits(logits, cfg, seen)
    if cfg.greedy:
        return processed.argmax(-1)
    return draw(probabilities(processed, cfg), generator)


# --------------------------------------------------------------------------- state
def make_generator(cfg: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """The random stream of one call: seeded by cfg.seed, fresh when None; none for greedy decoding."""
    if cfg.greedy:
        return None
    gen = torch.Generator(device=device)
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)
    return gen


def seen_tokens(prompts: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """B×V bool: the tokens each prompt holds (the repetition penalty's memory; new tokens are added)."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(p, device=device)] = True
    return seen
