"""Requests → batched forward passes on any lmlab decoder model.

The one place where text is scored (evaluation and in-context learning both come here):

- `loglikelihood`: requests that share a context are grouped; each context runs once, its keys/values
  are kept in a KVCache, and all of its continuations then run as one batch against copies of that
  cache (`KVCache.select`). A one-token continuation needs no second pass at all: its score is read
  from the context's last position. Groups are sorted by length so batches carry little padding.
- Padding never changes a score: sequences are right-padded, so under causal attention a real token
  never sees a pad, and pads in the cache are marked invalid for the continuation pass.
- Logits are computed only at the positions that are scored (the vocabulary projection is the
  largest matrix of a small model), in float32, and under torch.inference_mode.
- Under torchrun each process takes every world-th batch; results are gathered to every rank.

Tokenisation follows lm-evaluation-harness so scores are comparable: trailing spaces of a context
move to the continuation, the continuation's tokens are those of `context + continuation` after the
context's tokens, and an empty context is replaced by the model's prefix token (BOS, else EOS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.eval.progress import Progress
from lmlab.eval.requests import (GenerateUntil, Loglikelihood, LoglikelihoodResult, LoglikelihoodRolling,
                                 RollingResult)

HEAD_CHUNK = 1024  # scored positions per vocabulary projection (bounds the N×V logits tensor)


@dataclass
class _Group:
    """One distinct context and the continuations scored against it."""

    context: list[int]
    items: list[tuple[int, list[int]]]  # (request index, continuation ids)

    @property
    def length(self) -> int:
        return len(self.context) + max(len(c) for _, c in self.items) - 1


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(local: dict[int, object], world: int) -> dict[int, object]:
    if world == 1:
        return local
    parts: list[dict[int, object]] = [None] * world  # type: ignore[list-item]
    torch.distributed.all_gather_object(parts, local)
    merged: dict[int, object] = {}
    for part in parts:
        merged.update(part)
    return merged


class Engine:
    """Answers requests for one model + tokenizer. `batch_size` is the number of contexts per forward."""

    def __init__(self, model, tokenizer, *, batch_size: int = 32, max_length: int | None = None,
                 progress: bool = True):
        if getattr(model, "decoder", None) is None or getattr(model, "encoder", None) is not None:
            raise LmlabError("evaluation needs a decoder-only model (this one is "
                             f"{getattr(model.cfg, 'arch', 'unknown')})")
        if batch_size < 1:
            raise LmlabError(f"--batch-size must be at least 1 (got {batch_size})")
        self.model, self.tok = model, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.cfg.max_seq_len
        self.device = model.tok_emb.weight.device
        self.rank, self.world = _dist()
        self.progress = progress and self.rank == 0

    # ------------------------------------------------------------------ tokenisation
    @property
    def prefix_id(self) -> int:
        pid = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
        return pid if pid is not None else 0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation)
            return [self.prefix_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ model pieces
    def _hidden(self, ids: torch.Tensor, valid: torch.Tensor | None = None, cache=None,
                causal_only: bool = True) -> torch.Tensor:
        """Final hidden states of right-padded `ids` (B×T, `valid` marks real tokens).

        With `cache` the keys/values are appended to it. `causal_only` says no earlier cache slot is
        padding, so plain causal attention is exact (right padding: a real token never sees a pad)."""
        model = self.model
        B, T = ids.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=ids.device)
        if cache is not None:
            start, positions = cache.reserve(valid)
        else:
            start, positions = 0, torch.arange(T, device=ids.device).expand(B, T)
        key_valid = None if causal_only else cache.valid
        h = model.decoder(model.embed(ids, positions), positions, key_valid=key_valid, cache=cache, start=start)
        if cache is not None:
            cache.commit(T)
        return h

    def _score(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log-probability of `targets` (N) given `hidden` (N×D), and whether it is the argmax."""
        logps, greedy = [], []
        for i in range(0, hidden.shape[0], HEAD_CHUNK):
            logits = self.model.head(hidden[i:i + HEAD_CHUNK]).float()
            lp = F.log_softmax(logits, dim=-1)
            t = targets[i:i + HEAD_CHUNK]
            logps.append(lp.gather(1, t[:, None])[:, 0])
            greedy.append(logits.argmax(-1) == t)
        return torch.cat(logps), torch.cat(greedy)

    def _pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.tok.pad_id or 0, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            valid[i, :len(r)] = True
        return ids.to(self.device), valid.to(self.device)

    # ------------------------------------------------------------------ loglikelihood
    def _groups(self, requests: Sequence[Loglikelihood]) -> list[_Group]:
        groups: dict[tuple[int, ...], _Group] = {}
        for i, r in enumerate(requests):
            ctx, cont = self.encode_pair(r.context, r.continuation)
            if not cont:
                raise LmlabError(f"continuation {r.continuation!r} encodes to no tokens")
            if len(ctx) + len(cont) - 1 > self.max_length:  # keep the end of the context
                keep = self.max_length - len(cont) + 1
                if keep < 1:
                    raise LmlabError(f"continuation of {len(cont)} tokens exceeds the model's "
                                     f"{self.max_length}-token window")
                ctx = ctx[-keep:]
            key = tuple(ctx)
            if key not in groups:
                groups[key] = _Group(list(ctx), [])
            groups[key].items.append((i, cont))
        return sorted(groups.values(), key=lambda g: (-g.length, g.context))

    def _score_groups(self, groups: list[_Group]) -> dict[int, LoglikelihoodResult]:
        ctx_ids, ctx_valid = self._pad([g.context for g in groups])
        ctx_len = torch.tensor([len(g.context) for g in groups], device=self.device)
        rows = [(gi, ri, cont) for gi, g in enumerate(groups) for ri, cont in g.items]
        longest = max(len(c) for _, _, c in rows)
        cache = None
        if longest > 1:
            cache = self.model.make_cache(len(groups), ctx_ids.shape[1] + longest - 1)
        h_ctx = self._hidden(ctx_ids, ctx_valid, cache)
        last = h_ctx[torch.arange(len(groups), device=self.device), ctx_len - 1]  # G×D
        # hidden state that predicts each continuation token, flattened over rows
        pieces = [last[[gi for gi, _, _ in rows]][:, None]]  # R×1×D: the first token of each row
        if cache is not None:
            cont_ids, cont_valid = self._pad([c[:-1] or [self.tok.pad_id or 0] for _, _, c in rows])
            for r, (_, _, c) in enumerate(rows):
                if len(c) == 1:
                    cont_valid[r] = False
            rcache = cache.select([gi for gi, _, _ in rows])
            pieces.append(self._hidden(cont_ids, cont_valid, rcache, causal_only=False))
        hs, targets, owners = [], [], []
        for r, (_, ri, c) in enumerate(rows):
            hs.append(pieces[0][r])
            if len(c) > 1:
                hs.append(pieces[1][r, :len(c) - 1])
            targets.extend(c)
            owners.extend([r] * len(c))
        logp, greedy = self._score(torch.cat(hs), torch.tensor(targets, device=self.device))
        owner = torch.tensor(owners, device=self.device)
        total = torch.zeros(len(rows), dtype=torch.float64, device=self.device).index_add_(0, owner, logp.double())
        misses = torch.zeros(len(rows), dtype=torch.long, device=self.device).index_add_(0, owner, (~greedy).long())
        all_greedy = misses == 0
        return {ri: LoglikelihoodResult(float(total[r]), bool(all_greedy[r]), len(c))
                for r, (_, ri, c) in enumerate(rows)}

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Loglikelihood], desc: str = "loglikelihood") -> list[LoglikelihoodResult]:
        groups = self._groups(requests)
        batches = [groups[i:i + self.batch_size] for i in range(0, len(groups), self.batch_size)]
        mine = batches[self.rank::self.world]
        bar = Progress(sum(len(g.items) for b in mine for g in b) * self.world, desc, self.progress)
        out: dict[int, LoglikelihoodResult] = {}
        for batch in mine:
            out.update(self._score_groups(batch))
            bar.update(sum(len(g.items) for g in batch) * self.world)
        bar.close()
        out = _gather(out, self.world)
        return [out[i] for i in range(len(requests))]

    # ------------------------------------------------------------------ rolling loglikelihood
    def windows(self, tokens: list[int], window: int, stride: int) -> list[tuple[list[int], list[int]]]:
        """(input ids, target ids) pairs covering every token of `tokens` once; the targets are
        predicted by the last len(targets) input positions.

        Each window predicts up to `stride` new tokens and sees up to `window` tokens of input, so the
        first `window - stride` inputs of a later window are context carried over. stride == window
        gives disjoint windows (lm-evaluation-harness's default)."""
        if not 1 <= stride <= window:
            raise LmlabError(f"rolling stride must be between 1 and the window ({window}); got {stride}")
        seq = [self.prefix_id] + tokens  # seq[j] predicts tokens[j]
        out, done = [], 0
        while done < len(tokens):
            n = min(window if done == 0 else stride, len(tokens) - done)
            end = done + n  # inputs seq[:end] predict tokens[:end]
            out.append((seq[max(0, end - window):end], tokens[done:end]))
            done = end
        return out

    @torch.inference_mode()
    def loglikelihood_rolling(self, requests: Sequence[LoglikelihoodRolling], *, window: int | None = None,
                              stride: int | None = None, desc: str = "rolling") -> list[RollingResult]:
        window = window or self.max_length
        stride = stride or window
        items = []  # (request index, input ids, n scored)
        counts = []
        for i, r in enumerate(requests):
            tokens = self.encode(r.text)
            counts.append(len(tokens))
            items.extend((i, ids, tgt) for ids, tgt in self.windows(tokens, window, stride))
        order = sorted(range(len(items)), key=lambda k: -len(items[k][1]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[self.rank::self.world]
        bar = Progress(len(items), desc, self.progress)
        local: dict[int, float] = {}
        for batch in mine:
            ids, _ = self._pad([items[k][1] for k in batch])
            h = self._hidden(ids)
            hs, targets, owners = [], [], []
            for r, k in enumerate(batch):
                _, inp, tgt = items[k]
                L, n = len(inp), len(tgt)
                hs.append(h[r, L - n:L])
                targets.extend(tgt)
                owners.extend([r] * n)
            logp, _ = self._score(torch.cat(hs), torch.tensor(targets, device=self.device))
            sums = torch.zeros(len(batch), dtype=torch.float64, device=self.device).index_add_(
                0, torch.tensor(owners, device=self.device), logp.double())
            for r, k in enumerate(batch):
                local[k] = float(sums[r])
            bar.update(len(batch) * self.world)
        bar.close()
        scores = _gather(local, self.world)
        totals = [0.0] * len(requests)
        for k, (i, _, _) in enumerate(items):
            totals[i] += scores[k]
        return [RollingResult(totals[i], counts[i]) for i in range(len(requests))]

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_until(self, requests: Sequence[GenerateUntil], desc: str = "generate") -> list[str]:
        try:
            from lmlab.generation import GenerationConfig, generate_from_ids
        except ImportError:
            raise LmlabError("generation tasks need lmlab.generation, which this install lacks") from None
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[self.rank::self.world]
        bar = Progress(len(requests), desc, self.progress)
        local: dict[int, str] = {}
        for batch in mine:
            by_settings: dict[tuple, list[int]] = {}
            for i in batch:
                r = requests[i]
                by_settings.setdefault((r.until, r.max_gen_toks, r.kwargs), []).append(i)
            for (until, max_new, kwargs), idx in by_settings.items():
                settings = {k: v for k, v in dict(kwargs).items() if k in ("temperature", "top_k", "top_p", "seed")}
                settings.setdefault("temperature", 0.0)
                cfg = GenerationConfig(max_new_tokens=max_new, stop=list(until), **settings)
                keep = max(1, self.max_length - max_new)  # as lm-evaluation-harness: keep the context's end
                prompts = [self.encode(requests[i].context)[-keep:] or [self.prefix_id] for i in idx]
                done = generate_from_ids(self.model, self.tok, prompts, cfg)
                for i, completion in zip(idx, done):
                    local[i] = _cut(completion.text, until)
            bar.update(len(batch) * self.world)
        bar.close()
        out = _gather(local, self.world)
        return [out[i] for i in range(len(requests))]


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text
