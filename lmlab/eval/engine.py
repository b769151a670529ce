"""Requests → batched forward passes on any lmlab decoder model.

The one place where text is scored (evaluation and in-context learning both come here):

- `loglikelihood`: requests that share a context are grouped, and each group runs as one packed
  sequence: the context once, then each continuation (all but its last token), under an attention mask
  that lets a continuation see the context and its own earlier tokens only, with positions continuing
  from the context. So the context's keys/values are computed once and shared by all its choices (KV
  reuse without copying a cache), and a one-token continuation costs nothing beyond its context.
  Groups are sorted by length and short ones share a row (first fit), so rows carry little padding.
- Padding never changes a score: a pad is never visible to a real token (right padding under a causal
  mask; the packing mask keeps groups apart).
- Logits are computed only at the positions that are scored (the vocabulary projection is the
  largest matrix of a small model), in float32, and under torch.inference_mode.
- A shared prefix (`with engine.sharing(prefix):`, e.g. in-context demonstrations fixed for a run) runs
  once into a KV cache; every request starting with it scores only the rest on top of that cache.
- Under torchrun each process takes every world-th batch; results are gathered to every rank.

Tokenisation follows lm-evaluation-harness so scores are comparable: trailing spaces of a context
move to the continuation, the continuation's tokens are those of `context + continuation` after the
context's tokens, and an empty context is replaced by the model's prefix token (BOS, else EOS).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.utils.progress import Progress
from lmlab.eval.requests import (GenerateUntil, Loglikelihood, LoglikelihoodResult, LoglikelihoodRolling,
                                 RollingResult)
from lmlab.inference.runner import as_runner
from lmlab.inference.sampling import GenerationConfig
from lmlab.inference.text import generate_from_ids
from lmlab.model import masks
from lmlab.utils.dist import current, gather_dict

HEAD_CHUNK = 1024  # scored positions per vocabulary projection (bounds the N×V logits tensor)


@dataclass
class _Group:
    """One distinct context and the continuations scored against it."""

    context: list[int]
    items: list[tuple[int, list[int]]]  # (request index, continuation ids)

    @property
    def packed(self) -> int:
        """Tokens in its packed form: the context once, then every continuation but its last token (the
        last token is only predicted, never fed; a one-token continuation adds nothing)."""
        return len(self.context) + sum(len(c) - 1 for _, c in self.items)


class Engine:
    """Answers requests for one model + tokenizer. `batch_size` is the number of contexts per forward.
    `model`: a Transformer, or a Runner (lmlab.inference.runner) whose compiled step generation then uses;
    `speculation`: how generation requests draft (None = plain decoding; greedy results are the same)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 32, max_length: int | None = None,
                 progress: bool = True, speculation=None):
        self.runner = as_runner(model)
        self.speculation = speculation  # generation requests decode speculatively (lmlab.inference.drafting)
        cfg = self.runner.cfg
        if cfg.arch != "decoder":
            raise LmlabError(f"evaluation needs a decoder-only model (this one is {cfg.arch})")
        if batch_size < 1:
            raise LmlabError(f"--batch-size must be at least 1 (got {batch_size})")
        if max_length is not None and not 1 <= max_length <= cfg.max_seq_len:
            raise LmlabError(f"--max-length {max_length} is outside the model's context window "
                             f"(1 to {cfg.max_seq_len} tokens)")
        self.model, self.tok = self.runner.model, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or cfg.max_seq_len
        self.device = self.runner.device
        d = current()
        self.rank, self.world = d.rank, d.world
        self.progress = progress and self.rank == 0
        self.shared_prefix: str | None = None  # see sharing()

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
    def _score(self, hidden: torch.Tensor, index: torch.Tensor,
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each of `targets` (N) at the positions `index` (N flat indices into `hidden`,
        B×T×D) selects, and whether it is the argmax. Only those positions are projected, in chunks."""
        logps, greedy = [], []
        for i in range(0, index.shape[0], HEAD_CHUNK):
            logits = self.model.logits(hidden, index[i:i + HEAD_CHUNK]).float()
            lp = F.log_softmax(logits, dim=-1)
            t = targets[i:i + HEAD_CHUNK]
            logps.append(lp.gather(1, t[:, None])[:, 0])
            greedy.append(logits.argmax(-1) == t)
        return torch.cat(logps), torch.cat(greedy)

    def _pad(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Right-padded rows: under a causal mask a real token never sees a pad, so no mask is needed."""
        T = max(len(r) for r in rows)
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        return torch.tensor([list(r) + [pad] * (T - len(r)) for r in rows], dtype=torch.long, device=self.device)

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
        return sorted(groups.values(), key=lambda g: (-g.packed, g.context))

    @staticmethod
    def _rows(groups: list[_Group]) -> list[list[_Group]]:
        """Pack groups (longest first) into rows no longer than the longest group: first fit."""
        cap = max(g.packed for g in groups)
        rows: list[list[_Group]] = []
        room: list[int] = []
        for g in groups:
            for r, free in enumerate(room):
                if free >= g.packed:
                    rows[r].append(g)
                    room[r] -= g.packed
                    break
            else:
                rows.append([g])
                room.append(cap - g.packed)
        return rows

    @staticmethod
    def _layout(rows: list[list[_Group]]):
        """Packed rows: each group is its context followed by its continuations (all but their last token).
        Returns ids, positions, segment and sub-sequence ids (rows × T), and for every scored token the
        flat index (row * T + slot) of the hidden state predicting it, the token, and its request index."""
        T = max(sum(g.packed for g in row) for row in rows)
        ids, pos, seg, sub = ([[0] * T for _ in rows] for _ in range(4))
        pred: list[int] = []
        targets: list[int] = []
        owner: list[int] = []
        for b, row in enumerate(rows):
            at = 0
            for gi, g in enumerate(row):
                n = len(g.context)
                ids[b][at:at + n], pos[b][at:at + n] = g.context, range(n)
                seg[b][at:at + n] = [gi + 1] * n
                last_ctx = b * T + at + n - 1
                at += n
                for k, (ri, c) in enumerate(g.items, 1):
                    m = len(c) - 1
                    ids[b][at:at + m], pos[b][at:at + m] = c[:-1], range(n, n + m)
                    seg[b][at:at + m], sub[b][at:at + m] = [gi + 1] * m, [k] * m
                    pred.extend([last_ctx, *range(b * T + at, b * T + at + m)])
                    targets.extend(c)
                    owner.extend([ri] * len(c))
                    at += m
        return ids, pos, seg, sub, pred, targets, owner

    def _results(self, h: torch.Tensor, pred: list[int], targets: list[int],
                 owner: list[int]) -> dict[int, LoglikelihoodResult]:
        dev = self.device
        logp, greedy = self._score(h, torch.tensor(pred, device=dev), torch.tensor(targets, device=dev))
        ids_of = sorted(set(owner))
        slot = {ri: j for j, ri in enumerate(ids_of)}
        idx = torch.tensor([slot[ri] for ri in owner], device=dev)
        total = torch.zeros(len(ids_of), dtype=torch.float64, device=dev).index_add_(0, idx, logp.double())
        misses = torch.zeros(len(ids_of), dtype=torch.long, device=dev).index_add_(0, idx, (~greedy).long())
        n_tok = torch.zeros(len(ids_of), dtype=torch.long, device=dev).index_add_(0, idx, torch.ones_like(idx))
        return {ri: LoglikelihoodResult(float(total[j]), bool(misses[j] == 0), int(n_tok[j]))
                for j, ri in enumerate(ids_of)}

    def _score_groups(self, groups: list[_Group]) -> dict[int, LoglikelihoodResult]:
        """One forward pass for a batch of groups. Each group is laid out as its context followed by its
        continuations (all but their last token); a mask lets each continuation see the context and its own
        earlier tokens only, with positions continuing from the context, so every continuation is scored
        exactly as if it followed the context alone while the context runs once. Several short groups share
        a row (their masks keep them apart), so rows carry almost no padding."""
        ids, pos, seg, sub, pred, targets, owner = self._layout(self._rows(groups))
        dev = self.device
        mask = masks.packed(torch.tensor(seg, device=dev), torch.tensor(sub, device=dev))
        h = self.model.hidden_states(torch.tensor(ids, device=dev), positions=torch.tensor(pos, device=dev),
                                     attn_mask=mask)
        return self._results(h, pred, targets, owner)

    # ------------------------------------------------------------------ shared prefix
    @contextmanager
    def sharing(self, prefix: str):
        """Within this block, loglikelihood requests whose context starts with `prefix` (in-context
        demonstrations fixed for a whole run, say) run the prefix once into a KV cache and score the rest
        of every context and its continuations on top of it. Requests that do not start with the prefix,
        or whose tokens would differ from the prefix's at the boundary, take the plain path."""
        old, self.shared_prefix = self.shared_prefix, prefix
        try:
            yield self
        finally:
            self.shared_prefix = old

    def _prefix_groups(self, requests: Sequence[Loglikelihood]) -> tuple[list[int], list[_Group], list[int]]:
        """The cached head (the prefix's tokens, less any its boundary with the rest re-tokenizes and less one
        more, which every group feeds again so it has a slot predicting its first continuation token), the
        groups keyed by the context after the head, and the requests left to the plain path."""
        encoded: dict[int, tuple[list[int], list[int]]] = {}
        rest: list[int] = []
        for i, r in enumerate(requests):
            if not r.context.startswith(self.shared_prefix):
                rest.append(i)
                continue
            ctx, cont = self.encode_pair(r.context, r.continuation)
            if not cont:
                raise LmlabError(f"continuation {r.continuation!r} encodes to no tokens")
            if len(ctx) + len(cont) - 1 > self.max_length:
                rest.append(i)
                continue
            encoded[i] = (ctx, cont)
        if not encoded:
            return [], [], rest
        prefix, first = self.encode(self.shared_prefix), next(iter(encoded.values()))[0]
        common = next((n for n, (a, b) in enumerate(zip(prefix, first)) if a != b), min(len(prefix), len(first)))
        head = first[:max(common - 1, 0)]
        groups: dict[tuple[int, ...], _Group] = {}
        for i, (ctx, cont) in encoded.items():
            if not head or ctx[:len(head)] != head:
                rest.append(i)
                continue
            key = tuple(ctx[len(head):])
            if key not in groups:
                groups[key] = _Group(list(key), [])
            groups[key].items.append((i, cont))
        return head, sorted(groups.values(), key=lambda g: (-g.packed, g.context)), sorted(rest)

    def _prefix_rows(self, groups: list[_Group], room: int) -> list[list[_Group]]:
        """Consecutive groups in one row each: at most batch_size groups and `room` tokens per row."""
        rows: list[list[_Group]] = []
        used = 0
        for g in groups:
            if rows and len(rows[-1]) < self.batch_size and used + g.packed <= room:
                rows[-1].append(g)
                used += g.packed
            else:
                rows.append([g])
                used = g.packed
        return rows

    def _score_on_prefix(self, requests: Sequence[Loglikelihood], bar: Progress) -> tuple[dict, list[int]]:
        head, groups, rest = self._prefix_groups(requests)
        if not groups:
            return {}, rest
        P = len(head)
        rows = self._prefix_rows(groups, max(max(g.packed for g in groups), self.max_length - P))
        cache = self.model.make_cache(1, P + max(sum(g.packed for g in row) for row in rows))
        self.model.hidden_states(torch.tensor([head], device=self.device), cache=cache)
        out: dict[int, LoglikelihoodResult] = {}
        for row in rows[self.rank::self.world]:
            ids, pos, seg, sub, pred, targets, owner = self._layout([row])
            T = len(ids[0])
            seen = torch.ones(1, T, P, dtype=torch.bool, device=self.device)
            own = masks.packed(torch.tensor(seg, device=self.device), torch.tensor(sub, device=self.device))
            h = self.model.hidden_states(torch.tensor(ids, device=self.device),
                                         positions=torch.tensor(pos, device=self.device) + P,
                                         attn_mask=torch.cat([seen, own], dim=2), cache=cache)
            cache.truncate(P)
            out.update(self._results(h, pred, targets, owner))
            bar.update(sum(len(g.items) for g in row) * self.world)
        return out, rest

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Loglikelihood], desc: str = "loglikelihood") -> list[LoglikelihoodResult]:
        bar = Progress(len(requests), desc, enabled=self.progress)
        out: dict[int, LoglikelihoodResult] = {}
        todo = list(range(len(requests)))
        if self.shared_prefix:
            out, todo = self._score_on_prefix(requests, bar)
        plain = [requests[i] for i in todo]
        groups = self._groups(plain) if plain else []
        batches = [groups[i:i + self.batch_size] for i in range(0, len(groups), self.batch_size)]
        for batch in batches[self.rank::self.world]:
            out.update({todo[k]: v for k, v in self._score_groups(batch).items()})
            bar.update(sum(len(g.items) for g in batch) * self.world)
        bar.close()
        out = gather_dict(out)
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

    def loglikelihood_rolling(self, requests: Sequence[LoglikelihoodRolling], *, window: int | None = None,
                              stride: int | None = None, desc: str = "rolling") -> list[RollingResult]:
        window = window or self.max_length
        stride = window if stride is None else stride
        items = []  # (request index, (input ids, target ids))
        counts = []
        for i, r in enumerate(requests):
            tokens = self.encode(r.text)
            counts.append(len(tokens))
            items.extend((i, w) for w in self.windows(tokens, window, stride))
        scores = self.score_windows([w for _, w in items], desc=desc)
        totals = [0.0] * len(requests)
        for (i, _), lp in zip(items, scores):
            totals[i] += lp
        return [RollingResult(totals[i], counts[i]) for i in range(len(requests))]

    @torch.inference_mode()
    def score_windows(self, windows: Sequence[tuple[list[int], list[int]]], desc: str = "rolling") -> list[float]:
        """Summed log-probability of each window's targets, predicted by its last len(targets) input
        positions (windows as `windows` makes them; retrieval augmentation builds its own)."""
        for inp, tgt in windows:
            if not 1 <= len(tgt) <= len(inp) or len(inp) > self.max_length:
                raise LmlabError(f"a window of {len(inp)} inputs cannot predict {len(tgt)} targets "
                                 f"in a {self.max_length}-token context")
        order = sorted(range(len(windows)), key=lambda k: -len(windows[k][0]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[self.rank::self.world]
        bar = Progress(len(windows), desc, enabled=self.progress)
        local: dict[int, float] = {}
        for batch in mine:
            h = self.model.hidden_states(self._pad([windows[k][0] for k in batch]))
            T = h.shape[1]
            index, targets, owners = [], [], []
            for r, k in enumerate(batch):
                inp, tgt = windows[k]
                L, n = len(inp), len(tgt)
                index.extend(range(r * T + L - n, r * T + L))
                targets.extend(tgt)
                owners.extend([r] * n)
            logp, _ = self._score(h, torch.tensor(index, device=self.device),
                                  torch.tensor(targets, device=self.device))
            sums = torch.zeros(len(batch), dtype=torch.float64, device=self.device).index_add_(
                0, torch.tensor(owners, device=self.device), logp.double())
            for r, k in enumerate(batch):
                local[k] = float(sums[r])
            bar.update(len(batch) * self.world)
        bar.close()
        scores = gather_dict(local)
        return [scores[k] for k in range(len(windows))]

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_until(self, requests: Sequence[GenerateUntil], desc: str = "generate") -> list[str]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        mine = batches[self.rank::self.world]
        bar = Progress(len(requests), desc, enabled=self.progress)
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
                done = generate_from_ids(self.runner, self.tok, prompts, cfg, speculation=self.speculation)
                for i, completion in zip(idx, done):
                    local[i] = _cut(completion.text, until)
            bar.update(len(batch) * self.world)
        bar.close()
        out = gather_dict(local)
        return [out[i] for i in range(len(requests))]


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text
