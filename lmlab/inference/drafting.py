"""Speculative decoding as a strategy of the one decoding loop (lmlab.inference.generate): who drafts, and
the one speculative step.

    Speculation(draft=runner, k=4)          a small draft model proposes up to k tokens per pass
    Speculation(prompt_lookup=3, k=8)       the row's own history proposes them (no model calls)

speculative_step (gpt-fast style): draft K tokens per row, score [last, d1..dK] with the target in one
pass, process both distributions through the same chain (repetition penalty counting the drafts before
each position as seen, temperature, top-k, top-p), verify (lmlab.inference.speculative), and roll both
caches back per row to what each row kept. Rows carry their own draft length (budget, lookup misses,
finished rows = 0) and their own accepted length.

Caches: `last` (the newest emitted token) is never in the target cache before a step; the draft cache
lags by `pending` tokens per row (what it has not seen yet: the token emitted by the target, plus the
last draft when a row accepted every draft, plus every token of plain steps), fed as one left-padded
chunk before the next draft.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.inference import sampling
from lmlab.inference.runner import Runner, as_runner
from lmlab.inference.sampling import GenerationConfig
from lmlab.inference.speculative import PromptLookup, Verdict, pad_drafts, verify, verify_greedy
from lmlab.utils.device import synchronize

DEFAULT_K = 4  # draft length when --speculate is not given (an upper bound when adaptive)


@dataclass
class Speculation:
    """How to speculate: a draft model (`draft`: a Transformer or Runner) or prompt lookup (`prompt_lookup`:
    the longest n-gram looked up), at most `k` drafts per pass; `adaptive` picks k per pass from the
    measured acceptance and cost ratio and switches speculation off while it would be slower."""

    draft: object | None = None
    k: int = DEFAULT_K
    prompt_lookup: int = 0
    adaptive: bool = True
    draft_name: str = "draft"  # for messages (a preset name or path)
    draft_vocab: torch.Tensor | None = None  # the token ids a narrowed draft head scores (narrow_head); None = all

    def __post_init__(self) -> None:
        if self.draft_vocab is not None and self.draft is None:
            raise LmlabError("speculation: a draft vocabulary (--draft-vocab) needs a draft model")
        if not isinstance(self.k, int) or self.k <= 0:
            raise LmlabError(f"speculation: k={self.k!r} is invalid (the draft length must be an integer >= 1)")
        if self.draft is not None and self.prompt_lookup:
            raise LmlabError("speculation: choose a draft model or prompt lookup, not both "
                             "(--draft and --prompt-lookup)")
        if self.draft is None and not self.prompt_lookup:
            raise LmlabError("speculation: give a draft model or prompt_lookup=N (the longest n-gram)")
        if not isinstance(self.prompt_lookup, int) or self.prompt_lookup < 0:
            raise LmlabError(f"speculation: prompt_lookup={self.prompt_lookup!r} is invalid (an n-gram length >= 1)")

    @property
    def method(self) -> str:
        return f"prompt lookup (n <= {self.prompt_lookup})" if self.prompt_lookup else f"draft model {self.draft_name}"


def check_pair(target_cfg, draft_cfg, target_tok=None, draft_tok=None, draft_name: str = "draft",
               target_name: str = "target") -> None:
    """A draft must be a causal LM over the target's vocabulary (same size, same tokenizer when known)."""
    check_target(target_cfg, target_name)
    if draft_cfg.arch != "decoder":
        raise LmlabError(f"speculation: the draft {draft_name} is an {draft_cfg.arch} model; "
                         "drafting needs a decoder-only (causal) language model")
    t_vocab = getattr(target_tok, "vocab_size", None)
    d_vocab = getattr(draft_tok, "vocab_size", None)
    same_tok = t_vocab == d_vocab and (target_tok is None or draft_tok is None
                                       or _tok_probe(target_tok) == _tok_probe(draft_tok))
    if draft_cfg.vocab_size != target_cfg.vocab_size or not same_tok:
        raise LmlabError(f"speculation: the draft {draft_name} has vocabulary {draft_cfg.vocab_size} "
                         f"(tokenizer {_tok_name(draft_tok, d_vocab)}), the target {target_name} {target_cfg.vocab_size} "
                         f"(tokenizer {_tok_name(target_tok, t_vocab)}); they must share one vocabulary")


def check_target(target_cfg, target_name: str = "target") -> None:
    if target_cfg.arch != "decoder":
        raise LmlabError(f"speculation: the target {target_name} is an {target_cfg.arch} model; "
                         "speculative decoding needs a decoder-only target")


def _tok_probe(tok) -> tuple:
    text = "def f(x):\n    return x + 1  # héllo"
    return tuple(tok.encode(text, add_special_tokens=False)), tok.eos_id


def _tok_name(tok, vocab) -> str:
    if tok is None:
        return "unknown"
    return f"{vocab} entries, eos id {tok.eos_id}, a test line in {len(_tok_probe(tok)[0])} tokens"


# --------------------------------------------------------------------------- caches
def ensure_room(cache, need: int) -> None:
    """Make room for `need` more slots: per-row rollback leaves holes; when the end is near, every row's
    valid slots move to the front (order kept), which frees the holes."""
    if cache.length + need <= cache.max_len:
        return
    valid = cache.valid[:, :cache.length]
    counts = valid.sum(1)
    m = int(counts.max())
    order = torch.sort((~valid).long(), dim=1, stable=True).indices[:, :m]  # each row's valid slots first
    for layer in range(len(cache.k)):
        for buf in (cache.k[layer], cache.v[layer]):
            idx = order[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            buf[:, :, :m] = buf.gather(2, idx)
    cache.valid[:, :m] = torch.arange(m, device=valid.device)[None, :] < counts[:, None]
    cache.valid[:, m:] = False
    cache.length, cache.padded = m, bool((counts != m).any())
    if m + need > cache.max_len:
        raise LmlabError(f"speculation: KV cache of {cache.max_len} slots cannot hold {m + need}")


def _ragged(rows: list[list[int]], active: list[bool], pad_id: int, device):
    """Left-padded B×T ids and mask (None when every row is real and full)."""
    T = max(max((len(r) for r in rows), default=1), 1)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = active[i]
    full = bool(mask.all())
    return ids.to(device), (None if full else mask.to(device))


# --------------------------------------------------------------------------- drafters
def narrow_head(model: torch.nn.Module, keep: int, extra_ids=()) -> torch.Tensor:
    """Let a draft score only part of the vocabulary (as FR-Spec, Zhao et al. 2025): the first `keep` token
    ids (byte-level BPE numbers its merges in the order it learned them, the frequent ones first) and
    `extra_ids` (the stop ids). The LM head becomes a copy of those rows, in place, before the model is
    prepared; a draft's step then reads keep/V of the head's bytes (the Qwen2.5 0.5B draft spends 27% of its
    bytes on a 151936-row head). ModelDrafter puts the logits back on the whole vocabulary with -inf
    elsewhere, so a draft never proposes the other ids and its q is 0 there: the output stays the target's
    (greedy: the same tokens; sampling: the same distribution), only acceptance changes. Returns the ids."""
    V = model.cfg.vocab_size
    if model.cfg.mlm_head or not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise LmlabError("draft vocabulary: the draft has no plain LM head to narrow")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 < keep < V:
        raise LmlabError(f"draft vocabulary: --draft-vocab {keep!r} must be between 1 and {V - 1} "
                         f"(the draft's vocabulary has {V} ids)")
    extra = [int(i) for i in extra_ids if i is not None and 0 <= int(i) < V]
    ids = torch.unique(torch.cat([torch.arange(keep), torch.tensor(extra, dtype=torch.long)]))
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, len(ids), bias=old.bias is not None, device=old.weight.device,
                           dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight[ids.to(old.weight.device)])
        if old.bias is not None:
            head.bias.copy_(old.bias[ids.to(old.weight.device)])
    model.lm_head = head.requires_grad_(False)
    return ids


class ModelDrafter:
    """Drafts with a small causal LM and its own KV cache (prefilled with the prompts by the loop).
    `vocab_ids`: the ids a narrowed head scores (narrow_head), None when it scores every id."""

    calls_per_token = 1

    def __init__(self, runner: Runner, cache, first: list[int], pad_id: int, vocab_ids: torch.Tensor | None = None):
        self.runner, self.cache, self.pad_id = runner, cache, pad_id
        self.pending = [[t] for t in first]
        self.vocab_ids = vocab_ids.to(runner.device) if vocab_ids is not None else None

    def plain(self, tokens: list[int]) -> None:
        for row, t in enumerate(tokens):
            self.pending[row].append(t)

    def propose(self, K: int, lengths: list[int], active: list[bool], cfg: GenerationConfig, generator, seen):
        """K drafts per row (B×K) and the processed probabilities they came from (B×K×V; None when greedy)."""
        device = self.runner.device
        ids, mask = _ragged(self.pending, active, self.pad_id, device)
        ensure_room(self.cache, ids.shape[1] + K)
        self.start, self.fed = self.cache.length, ids.shape[1]
        seen = seen.clone() if seen is not None else None
        rows = torch.arange(len(active), device=device)
        self.lengths = lengths
        drafts, probs = [], []
        for j in range(K):
            logits = self.runner.step(ids, self.cache, attention_mask=mask).float()
            if self.vocab_ids is not None:  # a narrowed head: back onto the whole vocabulary, -inf elsewhere
                logits = logits.new_full((logits.shape[0], self.runner.cfg.vocab_size),
                                         float("-inf")).index_copy_(1, self.vocab_ids, logits)
            processed = sampling.process_logits(logits, cfg, seen)
            if cfg.greedy:
                tok = processed.argmax(-1)
            else:
                p = sampling.probabilities(processed, cfg)
                tok = sampling.draw(p, generator)
                probs.append(p)
            if seen is not None:
                seen[rows, tok] = True
            drafts.append(tok)
            if j + 1 < K:  # a row feeds draft j+1 only when it wants draft j+2 (keeps it inside its window)
                wanted = [a and j + 1 < n for a, n in zip(active, lengths)]
                ids, mask = tok[:, None], (None if all(wanted) else torch.tensor(wanted, device=device)[:, None])
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs else None)

    def commit(self, drafts: list[list[int]], accepted: list[int], extra: list[int]) -> None:
        """Keep what each row accepted in the draft cache; the rest waits in `pending`."""
        kept = [max(0, min(a, n - 1)) for a, n in zip(accepted, self.lengths)]  # drafts fed and accepted
        self.cache.truncate([self.start + self.fed + n for n in kept])
        self.pending = [d[n:a] + [x] for d, n, a, x in zip(drafts, kept, accepted, extra)]


class LookupDrafter:
    """Drafts from each row's own history (prompt lookup): no model calls."""

    def __init__(self, prompts: list[list[int]], max_ngram: int, first: list[int], k: int):
        self.index = [PromptLookup(max_ngram, k, tokens=p + [t]) for p, t in zip(prompts, first)]

    def plain(self, tokens: list[int]) -> None:
        for idx, t in zip(self.index, tokens):
            idx.extend([t])

    def lookup(self, lengths: list[int]) -> list[list[int]]:
        return [idx.draft(n) if n > 0 else [] for idx, n in zip(self.index, lengths)]

    def commit(self, emitted: list[list[int]]) -> None:
        for idx, toks in zip(self.index, emitted):
            idx.extend(toks)


# --------------------------------------------------------------------------- the speculative step
@dataclass
class StepResult:
    verdict: Verdict
    lengths: list[int]  # drafts each row proposed
    draft_steps: int
    draft_s: float
    target_s: float


def _seen_at_positions(seen: torch.Tensor | None, drafts: torch.Tensor) -> torch.Tensor | None:
    """B×(K+1)×V: what counts as seen at each verified position (the drafts before it included)."""
    if seen is None:
        return None
    hit = F.one_hot(drafts, seen.shape[-1]).cumsum(1) > 0
    return torch.cat([seen[:, None], seen[:, None] | hit], 1)


def speculative_step(target: Runner, cache, last: torch.Tensor, drafter, lengths: list[int], active: list[bool],
                     cfg: GenerationConfig, generator, seen) -> StepResult | None:
    """One pass: draft, score [last, drafts] with the target at once, verify, roll both caches back.
    None when no row has anything to draft (the caller takes a plain step)."""
    device = target.device
    synchronize(device)
    t0 = time.perf_counter()
    if isinstance(drafter, LookupDrafter):
        found = drafter.lookup(lengths)
        lengths = [len(d) for d in found]
        if max(lengths) == 0:
            return None
        drafts, _ = pad_drafts(found, device=device)
        q, draft_steps = None, 1  # one lookup per pass
    else:
        drafts, q = drafter.propose(max(lengths), lengths, active, cfg, generator, seen)
        draft_steps = drafts.shape[1]
    K = drafts.shape[1]
    synchronize(device)
    t1 = time.perf_counter()
    feed = torch.cat([last[:, None], drafts], 1)
    pos = torch.arange(K + 1)[None, :]
    mask = (pos <= torch.tensor(lengths)[:, None]) & torch.tensor(active)[:, None]
    ensure_room(cache, K + 1)
    start = cache.length
    logits = target.logits_all(feed, cache, None if bool(mask.all()) else mask.to(device)).float()
    processed = sampling.process_logits(logits, cfg, _seen_at_positions(seen, drafts))
    n_draft = torch.tensor(lengths, device=device)
    if cfg.greedy:
        verdict = verify_greedy(processed, drafts, n_draft)
    else:
        verdict = verify(sampling.probabilities(processed, cfg), q, drafts, generator, n_draft)
    accepted = verdict.accepted.tolist()  # the pass's one host sync
    cache.truncate([start + n + 1 for n in accepted])
    t2 = time.perf_counter()
    if isinstance(drafter, ModelDrafter):
        extra = verdict.tokens[torch.arange(len(accepted), device=device), verdict.accepted].tolist()
        drafter.commit(drafts.tolist(), accepted, extra)
    return StepResult(verdict, lengths, draft_steps, t1 - t0, t2 - t1)


def compile_few(*runners: Runner) -> None:
    """For each compiled runner, its few-token step (verification passes; a draft catching up after a fully
    accepted pass), built once (ahead of time at batch 1: a minute or two the first time on a machine)."""
    for runner in runners:
        if runner.compiled:
            runner.decode_step.add_few()


def compiled_k_max(target: Runner, batch: int, k: int) -> int:
    """The most drafts per pass the adaptive controller may choose for a batch of `batch` rows: k, capped where
    a verification pass of batch × (k+1) rows would leave the target's compiled few-token step (DecodeStep.covers)
    for the eager forward, whose products take other kernels than the compiled plain steps (in 16-bit dtypes
    their last bits differ, so greedy output could part from plain greedy's) and cost more (measured: SmolLM2
    bf16 lookup at batch 4, 28-row passes at 1.95 plain batch steps)."""
    if not target.compiled or batch * 2 > target.decode_step.few_rows:
        return k
    return max(1, min(k, target.decode_step.few_rows // batch - 1))


def draft_runner(spec: Speculation, target: Runner) -> Runner:
    """The draft as a Runner on the target's device."""
    runner = as_runner(spec.draft)
    runner.model.eval()
    check_pair(target.cfg, runner.cfg, draft_name=spec.draft_name)
    if runner.device != target.device:
        raise LmlabError(f"speculation: the draft runs on {runner.device}, the target on {target.device}")
    return runner
