"""Speculative decoding, the model-free parts: verify drafts, draft by prompt lookup, pick k, report.

A speculative pass drafts k tokens cheaply (a small draft model, or a lookup in the row's own
history), runs the target model once over them, and keeps the longest prefix the target agrees
with plus one token of its own, so every pass emits 1..k+1 tokens and the output follows the
target's distribution exactly (Leviathan et al. 2023, Chen et al. 2023):

  verify            accept draft i with probability min(1, p/q); at the first rejection sample
                    from norm(max(0, p - q)); all accepted -> a bonus token from p at position k
  verify_greedy     accept while the draft equals the target's argmax; then the argmax
  prompt_lookup     draft what followed the most recent earlier occurrence of the tail n-gram
  DraftController   acceptance rate α and cost ratio c -> the k with the best expected
                    speed-up, or 0 (plain decoding) when no k beats plain, re-probing now and then
  SpecStats         counts and times for `--stats`

Everything here is batch-aware: B rows, each with its own draft length and accepted length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmlab.errors import LmlabError

PAD = -1  # fills the unused tail of Verdict.tokens
_DEGENERATE = 1e-6  # a residual with less mass than this is float noise: sample from p instead


# --------------------------------------------------------------------------- verification
@dataclass
class Verdict:
    """What a verification pass emits per row: `tokens[i, :counts[i]]`, the rest is PAD.

    accepted[i] = n_i draft tokens kept (0..k); counts = n_i + 1 (the kept drafts and one token
    from the target). A row with accepted == its draft length got the bonus token.
    """

    tokens: torch.Tensor  # B×(k+1) long
    accepted: torch.Tensor  # B long

    @property
    def counts(self) -> torch.Tensor:
        return self.accepted + 1

    def rows(self) -> list[list[int]]:
        return [row[: n + 1] for row, n in zip(self.tokens.tolist(), self.accepted.tolist())]


def _check(name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise LmlabError(f"speculative: {name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def _lengths(lengths: torch.Tensor | None, b: int, k: int, device) -> torch.Tensor:
    """Each row's draft length (default k for all) as a B long tensor."""
    if lengths is None:
        return torch.full((b,), k, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if lengths.shape != (b,):
        raise LmlabError(f"speculative: lengths must have shape ({b},), got {tuple(lengths.shape)}")
    return lengths


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries from the start are all True."""
    return mask.long().cumprod(dim=1).sum(dim=1)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row; p itself (normalised) where that has (numerically) no mass."""
    r = (p - q).clamp_min(0)
    mass = r.sum(-1, keepdim=True)
    fallback = mass <= _DEGENERATE
    r = torch.where(fallback, p, r)
    return r / torch.where(fallback, p.sum(-1, keepdim=True), mass)


def _assemble(draft_tokens: torch.Tensor, accepted: torch.Tensor, extra: torch.Tensor) -> Verdict:
    b, k = draft_tokens.shape
    pos = torch.arange(k + 1, device=draft_tokens.device).expand(b, k + 1)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((b, 1), PAD)], dim=1)
    tokens = torch.where(pos < accepted[:, None], padded, PAD)
    tokens = torch.where(pos == accepted[:, None], extra[:, None], tokens)
    return Verdict(tokens=tokens, accepted=accepted)


def verify(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_tokens: torch.Tensor,
           generator: torch.Generator | None = None, lengths: torch.Tensor | None = None) -> Verdict:
    """Speculative sampling for B rows of k draft tokens; the output is distributed as the target.

    target_probs B×(k+1)×V: the target's processed probabilities at the k draft positions and
    the bonus position (position i is the distribution of the token after draft i-1).
    draft_probs B×k×V: the processed probabilities each draft token was sampled from, or None
    for deterministic drafts (prompt lookup), which count as q = one-hot of the draft token.
    draft_tokens B×k long. lengths: optional B draft lengths <= k for ragged drafts (entries
    past a row's length are ignored; pad them with any valid id).
    """
    _check("target_probs", target_probs, 3)
    _check("draft_tokens", draft_tokens, 2)
    b, k = draft_tokens.shape
    if target_probs.shape[:2] != (b, k + 1):
        raise LmlabError(f"speculative: target_probs must be {b}×{k + 1}×V for {b}×{k} drafts, "
                         f"got {tuple(target_probs.shape)}")
    if draft_probs is not None and draft_probs.shape != (b, k, target_probs.shape[2]):
        raise LmlabError(f"speculative: draft_probs must be {b}×{k}×{target_probs.shape[2]}, "
                         f"got {tuple(draft_probs.shape)}")
    p_all = target_probs.float()
    draft_tokens = draft_tokens.long()
    n_draft = _lengths(lengths, b, k, p_all.device)
    accepted = _accept(p_all, draft_probs, draft_tokens, n_draft, generator)
    extra = _extra_token(p_all, draft_probs, draft_tokens, accepted, n_draft, generator)
    return _assemble(draft_tokens, accepted, extra)


def _accept(p_all, draft_probs, draft_tokens, n_draft, generator) -> torch.Tensor:
    """How many drafts each row keeps: draft i survives with probability min(1, p_i / q_i)."""
    b, k = draft_tokens.shape
    idx = draft_tokens[..., None]
    p = p_all[:, :k].gather(-1, idx).squeeze(-1)
    if draft_probs is None:
        chance = p.clamp(max=1.0)
    else:
        q = draft_probs.float().gather(-1, idx).squeeze(-1)
        chance = torch.where(q > 0, p / q, (p > 0).float()).clamp(max=1.0)  # 0/0 lands in the unused branch
    u = torch.rand(b, k, generator=generator, device=p_all.device)
    in_draft = torch.arange(k, device=p_all.device)[None, :] < n_draft[:, None]
    return _leading_true((u < chance) & in_draft)


def _extra_token(p_all, draft_probs, draft_tokens, accepted, n_draft, generator) -> torch.Tensor:
    """The target's own token after the kept drafts: from the residual at a rejection, else from p."""
    b, k = draft_tokens.shape
    rows = torch.arange(b, device=p_all.device)
    p = p_all[rows, accepted]
    rejected = accepted < n_draft  # this row stopped at a real draft token: q applies there
    at = accepted.clamp(max=max(k - 1, 0))
    if k == 0:
        q = torch.zeros_like(p)
    elif draft_probs is None:
        q = torch.zeros_like(p).scatter(-1, draft_tokens[rows, at][:, None], 1.0)
    else:
        q = draft_probs[rows, at].float()
    q = torch.where(rejected[:, None], q, 0.0)
    return torch.multinomial(_residual(p, q), 1, generator=generator).squeeze(1)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  lengths: torch.Tensor | None = None) -> Verdict:
    """Greedy verification: keep drafts while they equal the target's argmax, then emit the argmax.

    target_logits B×(k+1)×V (logits or probabilities: only the argmax matters); draft_tokens B×k.
    """
    _check("target_logits", target_logits, 3)
    _check("draft_tokens", draft_tokens, 2)
    b, k = draft_tokens.shape
    if target_logits.shape[:2] != (b, k + 1):
        raise LmlabError(f"speculative: target_logits must be {b}×{k + 1}×V for {b}×{k} drafts, "
                         f"got {tuple(target_logits.shape)}")
    best = target_logits.argmax(-1)
    n_draft = _lengths(lengths, b, k, best.device)
    in_draft = torch.arange(k, device=best.device)[None, :] < n_draft[:, None]
    accepted = _leading_true((best[:, :k] == draft_tokens) & in_draft)
    extra = best[torch.arange(b, device=best.device), accepted]
    return _assemble(draft_tokens.long(), accepted, extra)


def pad_drafts(drafts: list[list[int]], fill: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-row drafts -> (B×k long tensor padded with `fill`, B lengths), k = the longest."""
    k = max((len(d) for d in drafts), default=0)
    out = torch.full((len(drafts), k), fill, dtype=torch.long)
    for i, d in enumerate(drafts):
        out[i, : len(d)] = torch.tensor(d, dtype=torch.long)
    lengths = torch.tensor([len(d) for d in drafts], dtype=torch.long)
    return out.to(device), lengths.to(device)


# --------------------------------------------------------------------------- prompt lookup
def _token_list(tokens) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise LmlabError(f"prompt lookup: a row's tokens must be 1-D, got shape {tuple(tokens.shape)}")
        return tokens.tolist()
    return list(tokens)


def _check_lookup(max_ngram: int, k: int, min_ngram: int) -> None:
    if not 1 <= min_ngram <= max_ngram:
        raise LmlabError(f"prompt lookup: need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                         f"max_ngram={max_ngram}")
    if k < 0:
        raise LmlabError(f"prompt lookup: the draft length k must be >= 0, got {k}")


def prompt_lookup(tokens, max_ngram: int, k: int, min_ngram: int = 1) -> list[int]:
    """Up to k draft tokens from a row's own history (prompt + output so far).

    The longest n-gram (n = max_ngram .. min_ngram) that ends the history and occurred earlier
    wins; the draft is what followed its most recent earlier occurrence (cut at the history's
    end). Empty when no n-gram recurs. O(length · max_ngram); `PromptLookup` keeps an index.
    """
    _check_lookup(max_ngram, k, min_ngram)
    seq = _token_list(tokens)
    size = len(seq)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail = seq[size - n:]
        for start in range(size - n - 1, -1, -1):
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + k]
    return []


def prompt_lookup_batch(rows, max_ngram: int, k: int, min_ngram: int = 1) -> list[list[int]]:
    """prompt_lookup for each row (list of token lists, or a B×T tensor with no padding)."""
    if isinstance(rows, torch.Tensor) and rows.dim() != 2:
        raise LmlabError(f"prompt lookup: a batch must be B×T, got shape {tuple(rows.shape)}")
    return [prompt_lookup(row, max_ngram, k, min_ngram) for row in rows]


class PromptLookup:
    """prompt_lookup for a growing history in O(max_ngram) per token: an n-gram -> last start index.

    The index holds the n-grams that end before the last token, so a lookup of the tail n-gram
    finds an earlier occurrence that has at least one follower.
    """

    def __init__(self, max_ngram: int, k: int, min_ngram: int = 1, tokens=()):
        _check_lookup(max_ngram, k, min_ngram)
        self.max_ngram, self.k, self.min_ngram = max_ngram, k, min_ngram
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens) -> None:
        for t in _token_list(tokens):
            end = len(self.tokens)  # the n-grams ending at the current last token enter the index
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._last[tuple(self.tokens[end - n:end])] = end - n
            self.tokens.append(int(t))

    def draft(self, k: int | None = None) -> list[int]:
        k = self.k if k is None else k
        size = len(self.tokens)
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            start = self._last.get(tuple(self.tokens[size - n:]))
            if start is not None:
                return self.tokens[start + n:start + n + k]
        return []


# --------------------------------------------------------------------------- adaptive draft length
def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per pass with k drafts each accepted with probability α: 1 + α + ... + α^k."""
    return sum(alpha ** i for i in range(k + 1))  # = (1 - α^(k+1)) / (1 - α), exact at α = 1


def speedup(alpha: float | Sequence[float], c: float, k: int, v: float = 0.0, o: float = 0.0) -> float:
    """Expected speed-up over plain decoding: S(k) = (1 - α^(k+1)) / ((1 - α)(k·c + 1 + k·v + o)).

    c = draft cost per drafted token / one plain target step; v = extra cost of each verified
    token in the target pass relative to a plain step (0 when a k+1-token pass costs one step);
    o = the rest of a pass (verdict, cache roll-back, bookkeeping) in plain steps. Several α (the rows of a
    batch, one pass for all): the expected tokens averaged over them.
    """
    alphas = [alpha] if isinstance(alpha, (int, float)) else list(alpha)
    return sum(expected_tokens(a, k) for a in alphas) / len(alphas) / (k * c + 1.0 + k * v + o)


def best_k(alpha: float | Sequence[float], c: float, k_max: int, v: float = 0.0, o: float = 0.0) -> tuple[int, float]:
    """The k in 1..k_max with the highest expected speed-up, and that speed-up."""
    return max(((k, speedup(alpha, c, k, v, o)) for k in range(1, k_max + 1)), key=lambda t: t[1])


class _Ema:
    """Exponential moving average; None until the first value."""

    def __init__(self, decay: float):
        self.decay, self.value = decay, None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x


def _tried(proposed: int, accepted: int) -> int:
    """Draft tokens whose fate was decided: the accepted ones and the first rejected one."""
    return accepted + (accepted < proposed)


class DraftController:
    """Chooses each pass's draft length from running estimates of α and c; 0 means plain decoding.

    The loop asks `k` before a step, then reports the step with `record` (a speculative pass) or
    `record_plain` (a plain step). α is estimated per drafted token as accepted / decided (the
    drafts after a rejection were never judged), with exponentially decaying counts; c, v and o
    from the step times, each against the latest plain steps: while on, every `refresh_every`
    passes one step is plain (k = 0), so the comparison follows a machine whose speed drifts
    (a shared CPU's can halve within minutes). After `warmup` passes, speculation switches off when no k has
    S(k) >= 1; while off it re-probes after `probe_every` plain steps (doubling up to
    `probe_max` after each failed probe) for `probe_passes` passes of `probe_k` drafts (short, so
    that a probe that fails costs little), and switches back on only when S >= 1 + margin.
    """

    def __init__(self, k_max: int, *, cost_ratio: float | None = None, alpha_prior: float = 0.6,
                 prior_weight: float = 4.0, decay: float = 0.9, warmup: int = 4, margin: float = 0.05,
                 probe_every: int = 32, probe_max: int = 512, probe_passes: int = 2, probe_k: int = 2,
                 refresh_every: int | None = 16):
        if k_max < 1:
            raise LmlabError(f"draft controller: k_max must be >= 1, got {k_max}")
        if not 0.0 <= alpha_prior <= 1.0 or not 0.0 < decay < 1.0:
            raise LmlabError(f"draft controller: need 0 <= alpha_prior <= 1 and 0 < decay < 1, "
                             f"got alpha_prior={alpha_prior}, decay={decay}")
        self.k_max, self.decay, self.warmup, self.margin = k_max, decay, warmup, margin
        self.alpha_prior, self.prior_weight = alpha_prior, prior_weight
        self.probe_base, self.probe_max, self.probe_passes = probe_every, probe_max, probe_passes
        self.probe_every, self.probe_k = probe_every, min(probe_k, k_max)
        self._acc, self._tried = alpha_prior * prior_weight, prior_weight
        self._draft_s, self._verify_s = _Ema(decay), _Ema(decay)
        # plain steps are timed rarely (the first step, then one every refresh_every passes): each new one
        # weighs half, so one slow first step does not inflate every later ratio (measured: a first step of
        # 22.8 ms against 13-16 ms after it, SmolLM2 at batch 4)
        self._plain_s = _Ema(min(decay, 0.5))
        self._v, self._o = _Ema(decay), _Ema(decay)
        self.refresh_every, self._since_plain = refresh_every, 0
        self._c_given = cost_ratio
        self.on, self.passes, self._since_off, self._probing = True, 0, 0, 0
        self.reason: str | None = None  # why speculation is off, or the last time it went off
        self.events: list[tuple[int, str, str]] = []  # (steps so far, "off" | "on", why)
        self.steps = 0
        # a batch: α per row as well (the rows of a batch are different texts), and the rows the next pass
        # serves (set by the loop); S(k) then averages the expected tokens over those rows
        self._row_acc: dict[int, float] = {}
        self._row_tried: dict[int, float] = {}
        self.rows: list[int] | None = None

    # -- estimates
    @property
    def alpha(self) -> float:
        return self._acc / self._tried if self._tried > 0 else self.alpha_prior

    @property
    def c(self) -> float:
        """Draft seconds per drafted token / seconds of a plain target step (given, else measured)."""
        step = self._plain_s.value if self._plain_s.value is not None else self._verify_s.value
        if self._draft_s.value is None or not step:
            return self._c_given if self._c_given is not None else 0.0
        return self._draft_s.value / step

    @property
    def v(self) -> float:
        return max(self._v.value or 0.0, 0.0)

    @property
    def o(self) -> float:
        return max(self._o.value or 0.0, 0.0)

    def row_alpha(self, row: int) -> float:
        tried = self._row_tried.get(row, self.prior_weight)
        return self._row_acc.get(row, self.alpha_prior * self.prior_weight) / tried if tried > 0 else self.alpha_prior

    def best(self) -> tuple[int, float]:
        """The k with the highest expected speed-up, and that speed-up: one α, or (a batch with `rows` set) the
        expected tokens averaged over the rows the next pass serves, each with its own α; a pass costs the
        same whichever rows still draft, so a batch whose last live row stops matching its drafts goes plain."""
        alpha = [self.row_alpha(r) for r in self.rows] if self.rows else self.alpha
        return best_k(alpha, self.c, self.k_max, self.v, self.o)

    @property
    def k(self) -> int:
        """The draft length for the next step; 0 means take a plain step."""
        if self._probing or (self.on and self.passes == 0):  # a short first pass measures what a pass costs
            return self.probe_k
        if self.on:
            refresh = self.refresh_every is not None and self._since_plain >= self.refresh_every
            return 0 if refresh else self.best()[0]
        return 0

    # -- observations
    def record(self, proposed, accepted, draft_s: float | None = None, target_s: float | None = None,
               pass_s: float | None = None, rows: list[int] | None = None) -> None:
        """A speculative pass: per-row (or total) drafts proposed and accepted, and its times.

        draft_s: seconds spent drafting this pass; target_s: seconds of the verification pass;
        pass_s: seconds of the whole pass (drafting, verification and the rest); rows: which batch row each
        count belongs to (each row's own α).
        """
        proposed, accepted = _as_list(proposed), _as_list(accepted)
        if len(proposed) != len(accepted):
            raise LmlabError(f"draft controller: {len(proposed)} proposed counts but {len(accepted)} accepted")
        self.steps += 1
        k = max(proposed, default=0)
        if k == 0:
            return  # nothing was drafted (no lookup match): a plain step in effect
        self._acc = self.decay * self._acc + sum(accepted)
        self._tried = self.decay * self._tried + sum(_tried(p, a) for p, a in zip(proposed, accepted))
        for r, p, a in zip(rows or (), proposed, accepted):
            if p:  # a row with nothing drafted tells nothing of its α
                self._row_acc[r] = self.decay * self._row_acc.get(r, self.alpha_prior * self.prior_weight) + a
                self._row_tried[r] = self.decay * self._row_tried.get(r, self.prior_weight) + _tried(p, a)
        self._timings(k, draft_s, target_s, pass_s)
        self.passes += 1
        self._since_plain += 1
        self._decide()

    def record_plain(self, target_s: float | None = None) -> None:
        """A plain target step (speculation off); its time calibrates c and v."""
        self.steps += 1
        self._since_plain = 0
        if target_s is not None:
            self._plain_s.add(target_s)
        if not self.on and not self._probing:
            self._since_off += 1
            if self._since_off >= self.probe_every:
                self._probing = self.probe_passes
                self._acc, self._tried = self.alpha * 1.0, 1.0  # old evidence weighs one token
                for r in self._row_tried:
                    self._row_acc[r], self._row_tried[r] = self.row_alpha(r), 1.0

    def _timings(self, k: int, draft_s, target_s, pass_s) -> None:
        if draft_s is not None:
            self._draft_s.add(draft_s / k)
        if target_s is not None:
            self._verify_s.add(target_s)
            if self._plain_s.value:
                self._v.add((target_s / self._plain_s.value - 1.0) / k)
        if pass_s is not None and self._plain_s.value:
            self._o.add((pass_s - (draft_s or 0.0) - (target_s or 0.0)) / self._plain_s.value)

    def _decide(self) -> None:
        k, s = self.best()
        if self._probing:
            self._probing -= 1
            if self._probing == 0 and s >= 1.0 + self.margin:
                self._turn_on(k, s)
            elif self._probing == 0:
                self.probe_every = min(2 * self.probe_every, self.probe_max)
                self.reason = self._why(k, s, f"< {1.0 + self.margin:.2f} needed to resume after a re-probe")
                self._since_off = 0
        elif self.on and self.passes >= self.warmup and s < 1.0:
            self.on, self._since_off, self.reason = False, 0, self._why(k, s, "< 1")
            self.events.append((self.steps, "off", self.reason))

    def _turn_on(self, k: int, s: float) -> None:
        self.on, self.probe_every = True, self.probe_base
        self.events.append((self.steps, "on", f"re-probe expects speed-up {s:.2f} at k={k}"))

    @property
    def off_reason(self) -> str | None:
        """Why speculation is off now (for SpecStats.switched_off), None while it is on."""
        return None if self.on else self.reason

    def _why(self, k: int, s: float, verdict: str) -> str:
        return (f"expected speed-up {s:.2f} {verdict} at best k={k} (acceptance {self.alpha:.2f}, "
                f"cost ratio c={self.c:.2f}, verify cost v={self.v:.2f}, other o={self.o:.2f}) after {self.steps} steps")


def _as_list(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, int):
        return [x]
    return [int(v) for v in x]


# --------------------------------------------------------------------------- statistics
@dataclass
class SpecStats:
    """Counts and times of a speculative generation, for `--stats`.

    A row-pass is one row in one verification pass; it emits accepted + 1 tokens.
    """

    method: str = "speculative"
    proposed: int = 0
    accepted: int = 0
    passes: int = 0  # target verification passes (batch-level)
    row_passes: int = 0
    plain_steps: int = 0  # target steps taken without drafts
    emitted: int = 0
    histogram: dict[int, int] = field(default_factory=dict)  # accepted length -> row-passes
    draft_steps: int = 0
    draft_s: float = 0.0
    target_s: float = 0.0
    plain_s: float = 0.0
    total_s: float = 0.0
    switched_off: str | None = None

    def record(self, proposed, accepted, *, draft_steps: int | None = None, draft_s: float = 0.0,
               target_s: float = 0.0) -> None:
        """One verification pass: per-row drafts proposed and accepted; draft_steps = the draft
        forward passes (or lookups) it took, default the longest draft."""
        proposed, accepted = _as_list(proposed), _as_list(accepted)
        self.passes += 1
        self.row_passes += len(accepted)
        self.proposed += sum(proposed)
        self.accepted += sum(accepted)
        self.emitted += sum(accepted) + len(accepted)
        for a in accepted:
            self.histogram[a] = self.histogram.get(a, 0) + 1
        self.draft_steps += max(proposed, default=0) if draft_steps is None else draft_steps
        self.draft_s += draft_s
        self.target_s += target_s

    def record_plain(self, rows: int = 1, target_s: float = 0.0) -> None:
        self.plain_steps += 1
        self.emitted += rows
        self.plain_s += target_s

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens a row emits per verification pass (accepted drafts + 1)."""
        return (self.accepted + self.row_passes) / self.row_passes if self.row_passes else 0.0

    @property
    def cost_ratio(self) -> float | None:
        """Measured c: draft seconds per draft step / seconds per target step (plain if any)."""
        if not self.draft_steps:
            return None
        step = self.plain_s / self.plain_steps if self.plain_steps else (
            self.target_s / self.passes if self.passes else 0.0)
        return (self.draft_s / self.draft_steps) / step if step else None

    @property
    def tokens_per_s(self) -> float:
        return self.emitted / self.total_s if self.total_s else 0.0

    def histogram_line(self) -> str:
        top = max(self.histogram, default=-1)
        return " ".join(f"{n}:{self.histogram.get(n, 0)}" for n in range(top + 1))

    def format(self, plain_tokens_per_s: float | None = None) -> str:
        lines = [f"{self.method}:",
                 f"  acceptance rate   {self.acceptance_rate:.3f} ({self.accepted}/{self.proposed} drafts)",
                 f"  tokens per pass   {self.tokens_per_pass:.2f} ({self.passes} target passes, "
                 f"{self.plain_steps} plain steps)",
                 f"  accepted per pass {self.histogram_line() or '-'}"]
        c = self.cost_ratio
        if c is not None:
            lines.append(f"  cost ratio c      {c:.3f} (draft {1000 * self.draft_s / self.draft_steps:.2f} ms/step, "
                         f"target {1000 * self.target_s / max(self.passes, 1):.2f} ms/pass)")
        if self.total_s:
            line = f"  throughput        {self.tokens_per_s:.1f} tok/s ({self.emitted} tokens in {self.total_s:.2f}s)"
            if plain_tokens_per_s:
                line += f", x{self.tokens_per_s / plain_tokens_per_s:.2f} over plain {plain_tokens_per_s:.1f} tok/s"
            lines.append(line)
        if self.switched_off:
            lines.append(f"  speculation switched off: {self.switched_off}")
        return "\n".join(lines)
