"""The one decoding loop: `lmlab generate`, `lmlab chat`, eval's generation requests and bench/decode.py
all run generate_tokens.

  prefill     one chunked pass over the (left-padded) prompts into a fresh KV cache (Runner.prefill)
  the loop    next token per row (lmlab.inference.sampling), then one cached step of one token per row
              (Runner.step: the compiled step when the runner has one)
  the end     each row cut at its first stop id, at the token on_token said to stop on, or at its budget
  speculation the same loop where a step may be a speculative pass (lmlab.inference.drafting: a draft
              model or prompt lookup proposes tokens, the model verifies them in one pass, each row keeps
              its own number); the first step is plain and timed, DraftController picks k per pass

Decoder-only models get LEFT padding, so that every row's last prompt token sits in the same (last) slot
and every new token is written to the same slot for all rows; the cache keeps each row's own positions
and marks padding slots invalid. Encoder-decoder models send the prompts (right-padded) to the encoder and
start every decoder row from the model's decoder_start_id.

Host work per step is kept to what the caller asks for: with on_token (streaming, stop strings) every
token comes to the host as it is made; without it the tokens stay on the device until the end, and the
loop only looks (one sync) every CHECK_EVERY steps whether every row has met a stop id. A row that has
finished keeps riding along (its tokens are dropped at the end); it is masked out only where its
positions could otherwise run past the context window (rows with different budgets).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from lmlab.errors import LmlabError
from lmlab.inference import drafting, sampling
from lmlab.inference.drafting import Speculation
from lmlab.inference.runner import PREFILL_CHUNK, Runner, as_runner
from lmlab.inference.sampling import GenerationConfig
from lmlab.inference.speculative import DraftController, SpecStats
from lmlab.utils.device import synchronize

FinishReason = Literal["eos", "stop", "length"]
CHECK_EVERY = 8  # steps between looks at whether every row has stopped (without on_token)


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
    spec: SpecStats | None = None  # acceptance, cost ratio, switch-offs of a speculative run


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
        elif len(p) == context:
            raise LmlabError(f"prompt has {len(p)} tokens, which fills the model's context window of {context}: "
                             f"no room for a new token (at most {context - 1} prompt tokens)")
        else:
            budgets.append(min(max_new_tokens, context - len(p)))
    return budgets


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


def _prefill(runner: Runner, prompts: list[list[int]], pad_id: int, steps: int, chunk: int):
    """Run the prompts once; return the cache and the float logits that choose each row's first new token."""
    B, device, cfg = len(prompts), runner.device, runner.cfg
    if cfg.arch == "encoder-decoder":
        src, src_mask = _pad(prompts, pad_id, left=False, device=device)
        start = cfg.decoder_start_id if cfg.decoder_start_id is not None else pad_id
        cache = runner.new_cache(B, steps)
        first = torch.full((B, 1), start, dtype=torch.long, device=device)
        logits = runner.prefill(first, cache, encoder_input_ids=src, encoder_mask=src_mask)
    else:
        ids, mask = _pad(prompts, pad_id, left=True, device=device)
        ragged = len({len(p) for p in prompts}) > 1
        cache = runner.new_cache(B, ids.shape[1] + steps)
        logits = runner.prefill(ids, cache, attention_mask=mask if ragged else None, chunk=chunk)
    return cache, logits.float()


class _Watch:
    """Host-side bookkeeping for on_token: each token as it is made, rows that are done."""

    def __init__(self, budgets: list[int], stops: set[int], on_token: Callable[[int, int], bool | None] | None):
        self.budgets, self.stops, self.on_token = budgets, stops, on_token
        self.kept = [0] * len(budgets)
        self.done = [b == 0 for b in budgets]
        self.stopped_at: dict[int, int] = {}  # row → tokens kept when on_token said stop

    def see(self, next_ids: torch.Tensor) -> None:
        for row, tok in enumerate(next_ids.tolist()):
            if not self.done[row]:
                self.see_one(row, tok)

    def see_one(self, row: int, tok: int) -> None:
        if tok in self.stops:
            self.done[row] = True
            return
        self.kept[row] += 1
        if self.on_token is not None and self.on_token(row, tok):
            self.done[row] = True
            self.stopped_at[row] = self.kept[row]
        elif self.kept[row] >= self.budgets[row]:
            self.done[row] = True

    def see_rows(self, rows: list[list[int]], made: list[list[int]]) -> None:
        """Several tokens per row (a speculative pass), in order; `made` gets what each row took in."""
        for row, toks in enumerate(rows):
            for tok in toks:
                if self.done[row]:
                    break
                made[row].append(tok)
                self.see_one(row, tok)


def _decode(runner: Runner, cache, logits: torch.Tensor, budgets: list[int], cfg: GenerationConfig,
            stops: set[int], pad_id: int, seen, on_token) -> tuple[torch.Tensor, dict[int, int]]:
    """The token loop. Returns the tokens made (B×steps run, finished rows included) and on_token's stops."""
    B, steps, device = len(budgets), max(budgets), runner.device
    generator = sampling.make_generator(cfg, device)
    uniform = len(set(budgets)) == 1  # then no row's positions can pass the window: nobody needs masking
    budget_t = None if uniform else torch.tensor(budgets, device=device)
    stop_t = torch.tensor(sorted(stops), device=device) if stops else None
    watch = _Watch(budgets, stops, on_token) if on_token is not None else None
    rows = torch.arange(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for t in range(steps):
        next_ids = sampling.next_token(logits, cfg, generator, seen)
        if seen is not None:
            seen[rows, next_ids] = True
        out.append(next_ids)
        if watch is not None:  # one host sync per step: the caller wants every token now
            watch.see(next_ids)
            finished = all(watch.done)
            done = torch.tensor(watch.done, device=device) if not uniform else done
        else:
            if stop_t is not None:
                done = done | torch.isin(next_ids, stop_t)
            if budget_t is not None:
                done = done | (budget_t <= t + 1)
            finished = stop_t is not None and (t + 1) % CHECK_EVERY == 0 and bool(done.all())
        if finished or t + 1 == steps:
            break
        if uniform:
            logits = runner.step(next_ids[:, None], cache)
        else:
            active = ~done
            feed = torch.where(active, next_ids, torch.full_like(next_ids, pad_id))
            logits = runner.step(feed[:, None], cache, attention_mask=active[:, None])
        logits = logits.float()
    return torch.stack(out, 1), (watch.stopped_at if watch is not None else {})


def _room(budgets: list[int], k: int) -> int:
    """Cache slots past the prompt for a speculative run: the budget, one pass of drafts, and slack for the
    holes per-row rollback leaves (ensure_room compacts when they run out)."""
    steps = max(budgets)
    return steps + 2 * (k + 2) + steps // 2 + 16


def _decode_speculative(runner: Runner, cache, logits: torch.Tensor, budgets: list[int], cfg: GenerationConfig,
                        stops: set[int], pad_id: int, seen, on_token, spec, prompts: list[list[int]],
                        chunk: int) -> tuple[list[list[int]], dict[int, int], SpecStats]:
    """The token loop with speculation: each pass is a speculative step (drafting.speculative_step) or, when
    the controller says so (or nothing could be drafted), a plain step. With the adaptive controller the
    first step is plain and timed, so that the cost ratio c has its denominator from the start."""
    B, device = len(budgets), runner.device
    generator = sampling.make_generator(cfg, device)
    watch, made = _Watch(budgets, stops, on_token), [[] for _ in budgets]
    rows = torch.arange(B, device=device)
    last = sampling.next_token(logits, cfg, generator, seen)
    if seen is not None:
        seen[rows, last] = True
    first = last.tolist()
    watch.see_rows([[t] for t in first], made)
    drafting.compile_few(runner)
    if spec.prompt_lookup:
        drafter = drafting.LookupDrafter(prompts, spec.prompt_lookup, first, spec.k)
    else:
        draft = drafting.draft_runner(spec, runner)
        drafting.compile_few(draft)
        draft_cache, _ = _prefill(draft, prompts, pad_id, _room(budgets, spec.k), chunk)
        drafter = drafting.ModelDrafter(draft, draft_cache, first, pad_id, vocab_ids=spec.draft_vocab)
    control = DraftController(drafting.compiled_k_max(runner, B, spec.k)) if spec.adaptive else None
    stats = SpecStats(method=spec.method)
    plain_first = control is not None  # a timed plain step first gives the controller its c
    while not all(watch.done):
        active = [not d for d in watch.done]
        if control is not None:
            control.rows = [i for i in range(B) if active[i]]
        k = 0 if plain_first else (control.k if control is not None else spec.k)
        lengths = [min(k, b - n - 1) if a else 0 for a, b, n in zip(active, budgets, watch.kept)]
        step = None
        if max(lengths) > 0:
            t_pass = time.perf_counter()
            step = drafting.speculative_step(runner, cache, last, drafter, lengths, active, cfg, generator, seen)
            t_pass = time.perf_counter() - t_pass
        if step is None:
            synchronize(device)
            t0 = time.perf_counter()
            drafting.ensure_room(cache, 1)
            mask = None if all(active) else torch.tensor(active, device=device)[:, None]
            feed = last if mask is None else torch.where(mask[:, 0], last, torch.full_like(last, pad_id))
            last = sampling.next_token(runner.step(feed[:, None], cache, attention_mask=mask).float(), cfg,
                                       generator, seen)
            emitted = [[t] for t in last.tolist()]
            took = time.perf_counter() - t0
            stats.record_plain(sum(active), took)
            if control is not None:
                control.record_plain(took)
            drafter.plain([e[0] for e in emitted])
        else:
            emitted = step.verdict.rows()
            last = step.verdict.tokens[rows, step.verdict.accepted]
            live = [i for i in range(B) if active[i]]
            proposed, accepted = [step.lengths[i] for i in live], [len(emitted[i]) - 1 for i in live]
            stats.record(proposed, accepted, draft_steps=step.draft_steps, draft_s=step.draft_s,
                         target_s=step.target_s)
            if control is not None:
                control.record(proposed, accepted, draft_s=step.draft_s, target_s=step.target_s, pass_s=t_pass,
                               rows=live)
            if isinstance(drafter, drafting.LookupDrafter):
                drafter.commit(emitted)
        if seen is not None:
            for i, toks in enumerate(emitted):
                seen[i, torch.tensor(toks, device=device)] = True
        watch.see_rows(emitted, made)
        plain_first = False
    if control is not None:
        stats.switched_off = control.off_reason or (control.reason and f"for a while: {control.reason}")
    return made, watch.stopped_at, stats


def _finish(made: list[list[int]], budgets: list[int], stops: set[int],
            stopped_at: dict[int, int]) -> tuple[list[list[int]], list[FinishReason]]:
    """Each row's kept tokens and why it ended, from everything the loop made for it."""
    tokens, reasons = [], []
    for row, seq in enumerate(made):
        kept: list[int] = []
        reason: FinishReason = "length"
        for tok in seq:
            if len(kept) >= budgets[row]:
                break
            if tok in stops:
                reason = "eos"
                break
            kept.append(tok)
            if stopped_at.get(row) == len(kept):
                reason = "stop"
                break
        tokens.append(kept)
        reasons.append(reason)
    return tokens, reasons


def generate_tokens(model, prompts: list[list[int]], cfg: GenerationConfig, *, stop_ids: list[int], pad_id: int,
                    on_token: Callable[[int, int], bool | None] | None = None,
                    chunk: int = PREFILL_CHUNK, speculation: Speculation | None = None) -> TokenResult:
    """Generate new tokens for every prompt in one batch (`model`: a Transformer or a Runner).

    A row ends at one of `stop_ids` (not included; finish "eos"), at its token budget ("length"), or when
    on_token(row, token_id) returns True ("stop"; the token is included). on_token is called once per kept
    token, in order, as the token is made. `speculation` (lmlab.inference.drafting.Speculation): draft with
    a small model or by prompt lookup and verify with the model; the output follows the same distribution
    (greedy: the same tokens); TokenResult.spec holds its statistics.
    """
    if not prompts:
        return TokenResult([], [], Timing(0.0, 0.0, 0))
    runner = as_runner(model)
    if runner.cfg.arch == "encoder":
        raise LmlabError("an encoder-only model cannot generate text; use a decoder or encoder-decoder model")
    budgets = token_budgets(runner.cfg, prompts, cfg.max_new_tokens)
    if speculation is not None and speculation.draft is not None:
        draft_cfg = as_runner(speculation.draft).cfg
        drafting.check_pair(runner.cfg, draft_cfg, draft_name=speculation.draft_name)
        budgets = [min(a, b) for a, b in zip(budgets, token_budgets(draft_cfg, prompts, cfg.max_new_tokens))]
    elif speculation is not None:
        drafting.check_target(runner.cfg)
    if max(budgets) == 0:
        return TokenResult([[] for _ in prompts], ["length"] * len(prompts), Timing(0.0, 0.0, 0))
    stops = set() if cfg.ignore_eos else set(stop_ids)
    model, device = runner.model, runner.device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            seen = None
            if cfg.repetition_penalty != 1.0:
                seen = sampling.seen_tokens(prompts, runner.cfg.vocab_size, device)
            synchronize(device)
            t0 = time.perf_counter()
            room = max(budgets) if speculation is None else _room(budgets, speculation.k)
            cache, logits = _prefill(runner, prompts, pad_id, room, chunk)
            synchronize(device)
            t1 = time.perf_counter()
            spec = None
            if speculation is None:
                made, stopped_at = _decode(runner, cache, logits, budgets, cfg, stops, pad_id, seen, on_token)
                made_rows = made.tolist()  # the one host sync of a run without on_token
            else:
                made_rows, stopped_at, spec = _decode_speculative(runner, cache, logits, budgets, cfg, stops, pad_id,
                                                                  seen, on_token, speculation, prompts, chunk)
            t2 = time.perf_counter()
    finally:
        model.train(was_training)
    tokens, reasons = _finish(made_rows, budgets, stops, stopped_at)
    timing = Timing(prefill_s=t1 - t0, decode_s=t2 - t1, decode_tokens=sum(len(t) for t in tokens))
    if spec is not None:
        spec.emitted, spec.total_s = timing.decode_tokens, timing.decode_s
    return TokenResult(tokens, reasons, timing, spec)


def generate_ids(model, prompts: list[list[int]], cfg: GenerationConfig, *, stop_ids: list[int], pad_id: int,
                 on_token: Callable[[int, int], bool | None] | None = None,
                 speculation: Speculation | None = None) -> list[list[int]]:
    """New token ids per row (without the prompt, without the stop id). See generate_tokens."""
    return generate_tokens(model, prompts, cfg, stop_ids=stop_ids, pad_id=pad_id, on_token=on_token,
                           speculation=speculation).tokens
