"""A Runner: a model plus what makes it fast at decoding (a compiled step), held by the caller.

    runner = Runner(model)                      eager
    runner = load("smollm2-135m", run)[0]       as `lmlab generate` prepares it (see lmlab.inference.load)
    cache = runner.new_cache(B, max_len)
    logits = runner.prefill(ids, cache, chunk=512)   B×V logits of the last prompt position
    logits = runner.step(next_ids, cache)            B×V logits after one more token per row
    logits = runner.logits_all(ids, cache)           B×T×V logits of every fed position (verification)

Every decoding loop (generation, chat, eval's generation requests, the benchmark) goes through these two.
"""
from __future__ import annotations

import torch

from lmlab.errors import LmlabError
from lmlab.utils.device import free_memory

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory, keeps matmuls at full speed


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Runner:
    def __init__(self, model: torch.nn.Module, decode_step=None):
        self.model = model
        self.decode_step = decode_step  # lmlab.inference.compile.DecodeStep, or None (eager)
        self.kernels = None  # lmlab.inference.kernels.KernelChoice: each layer's kernel and its timings

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def compiled(self) -> bool:
        return self.decode_step is not None and not self.decode_step.failed

    def new_cache(self, batch: int, max_len: int):
        """A KV cache for `batch` rows of `max_len` positions, refused up front (LmlabError saying what is
        needed and what fits) when the device has not that much memory free."""
        per_position = self.cache_bytes(1, 1)
        free = free_memory(self.device)
        if free is not None and batch * max_len * per_position > free:
            rows, positions = free // (max_len * per_position), free // (batch * per_position)
            raise LmlabError(f"the KV cache for {batch} prompt(s) x {max_len} positions needs "
                             f"{_size(batch * max_len * per_position)} but {_size(free)} is free "
                             f"on {self.device} (that fits {rows} prompt(s) of this length, or {positions} positions "
                             f"for {batch}: pass fewer prompts or a lower --max-new-tokens)")
        return self.model.make_cache(batch, max_len)

    def cache_bytes(self, batch: int, max_len: int) -> int:
        """Bytes of the keys and values a KV cache of `batch` x `max_len` positions holds."""
        cfg, dtype = self.cfg, next(self.model.parameters()).dtype
        layers = (cfg.n_decoder_layer or cfg.n_layer) if cfg.arch == "encoder-decoder" else cfg.n_layer
        return 2 * layers * batch * cfg.n_kv_head * max_len * cfg.head_dim * dtype.itemsize

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, cache, *, attention_mask: torch.Tensor | None = None,
                chunk: int = PREFILL_CHUNK, **encoder) -> torch.Tensor:
        """Run a B×T prompt into `cache` in chunks of at most `chunk` tokens; B×V logits of its last position
        (only that position is projected onto the vocabulary). `encoder`: encoder_input_ids/encoder_mask."""
        h = None
        for s in range(0, ids.shape[1], chunk):
            mask = attention_mask[:, s:s + chunk] if attention_mask is not None else None
            h = self.model.hidden_states(ids[:, s:s + chunk], attention_mask=mask, cache=cache,
                                         **(encoder if s == 0 else {}))
        return self.model.logits(h, "last")[:, -1]

    def step(self, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """B×V logits after feeding ids (B×T, usually T = 1) on top of `cache`: the compiled step when there
        is one and it covers T, else the eager forward."""
        if self.compiled and self.decode_step.covers(*ids.shape):
            return self.decode_step(ids, cache, attention_mask)[:, -1]
        with torch.inference_mode():
            h = self.model.hidden_states(ids, attention_mask=attention_mask, cache=cache)
            return self.model.logits(h, "last")[:, -1]

    @torch.inference_mode()
    def logits_all(self, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """B×T×V logits of every position of ids fed on top of `cache` (speculative verification): the
        compiled step when there is one and it covers T, else the eager forward."""
        if self.compiled and self.decode_step.covers(*ids.shape):
            return self.decode_step(ids, cache, attention_mask)
        h = self.model.hidden_states(ids, attention_mask=attention_mask, cache=cache)
        return self.model.logits(h)

    @torch.inference_mode()
    def warm(self, steps: int = 2, batch: int = 1, tokens: tuple[int, ...] = ()) -> None:
        """A couple of tiny passes: fast kernels chosen and checked, lazy buffers built; with a compiled step,
        its graphs for `batch` rows built too. tokens: also one pass of each of these token counts (a
        verification pass of k+1: with more than one row torch.compile builds a graph per kernel choice)."""
        model, device = self.model, self.device
        if model.cfg.arch == "encoder":
            model.hidden_states(torch.zeros(batch, 2, dtype=torch.long, device=device))
            return
        zeros = torch.zeros(batch, 2, dtype=torch.long, device=device)
        encoder = {"encoder_input_ids": zeros} if model.cfg.arch == "encoder-decoder" else {}
        cache = self.new_cache(batch, steps + 2 + sum(tokens))
        self.prefill(zeros, cache, **encoder)
        for _ in range(steps):
            self.step(torch.zeros(batch, 1, dtype=torch.long, device=device), cache)  # (strides as the loop's)
        for T in tokens:
            self.logits_all(torch.zeros(batch, T, dtype=torch.long, device=device), cache)


def as_runner(model) -> Runner:
    """A Runner as given, or an eager one around a bare model."""
    return model if isinstance(model, Runner) else Runner(model)
