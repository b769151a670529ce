"""Runtime: dtype/quantization choice with named fallbacks, threads, chunked prefill, the fast greedy
path against a cache-free reference, cached decoding against a full forward, compiled against eager."""
from __future__ import annotations

import pytest
import torch

from lmlab import runtime
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.quantize import QuantLinear
from test_generation import margin_model as model_for  # random weights whose logits depend on context
from test_generation import prompts_of


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """No cache at all: the whole sequence again for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# --------------------------------------------------------------------------- cached decoding = full forward
DECODERS = [("tiny-llama", {}), ("baby-gpt", {}), ("gpt2", dict(n_layer=2, d_model=64, n_head=4, vocab_size=300)),
            ("tiny-llama", dict(n_kv_head=1))]


@pytest.mark.parametrize("name,kw", DECODERS)
def test_cached_steps_equal_full_forward(name, kw):
    model = model_for(name, **kw)
    V = model.cfg.vocab_size
    torch.manual_seed(1)
    ids = torch.randint(3, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded: its own positions start later
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.make_cache(2, 16)
        parts = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache)]
        for t in range(5, 12):
            parts.append(model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache))
    stepped = torch.cat(parts, 1)
    real = mask.bool()
    assert (stepped - full)[real].abs().max() <= 1e-5


def test_encoder_decoder_cached_steps_equal_full_forward():
    model = model_for("t5-small", n_layer=2, d_model=64, d_ff=128, n_head=4, head_dim=16, vocab_size=300)
    torch.manual_seed(2)
    src = torch.randint(2, 300, (2, 9))
    src_mask = torch.ones_like(src)
    src_mask[0, 6:] = 0
    tgt = torch.randint(2, 300, (2, 7))
    with torch.no_grad():
        full = model(tgt, encoder_input_ids=src, encoder_mask=src_mask)
        cache = model.make_cache(2, 8)
        parts = [model(tgt[:, :1], encoder_input_ids=src, encoder_mask=src_mask, cache=cache)]
        for t in range(1, 7):
            parts.append(model(tgt[:, t:t + 1], cache=cache))
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5


def test_last_logits_only_is_the_last_row_of_the_full_logits():
    model = model_for("tiny-llama")
    ids = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, last_logits_only=True)
    assert last.shape == (2, 1, 512) and torch.allclose(last, full[:, -1:], atol=1e-6)


# --------------------------------------------------------------------------- prefill and the fast greedy path
def test_chunked_prefill_equals_one_pass():
    model = model_for("tiny-llama")
    ids = torch.randint(0, 512, (1, 40))
    one, cache1, _ = runtime.prefill(model, ids, max_new_tokens=4, chunk=512)
    chunked, cache2, seconds = runtime.prefill(model, ids, max_new_tokens=4, chunk=16)
    assert seconds > 0
    assert (one - chunked).abs().max() <= 1e-5
    assert cache1.length == cache2.length == 40
    assert max((a - b).abs().max() for a, b in zip(cache1.k, cache2.k)) <= 1e-5


@pytest.mark.parametrize("name", ["tiny-llama", "baby-gpt"])
def test_fast_greedy_equals_reference_tokens_float32(name):
    model = model_for(name)
    prompt = [5, 17, 3, 42, 9, 11]
    n = 20 if name == "tiny-llama" else 12
    result = runtime.greedy(model, prompt, n, chunk=4)
    assert result.tokens == reference_greedy(model, prompt, n)
    assert len(set(result.tokens)) >= 2  # the model does not just repeat one token, so equality means something
    assert result.decode_steps == n - 1 and result.tokens_per_s > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "baby-gpt"])
def test_compiled_decoding_gives_the_eager_tokens(name):
    """The compiled step (static cache, mask from validity) against the eager forward: one prompt at two
    lengths (two cache sizes, one graph) and a left-padded batch whose rows finish at different steps."""
    from lmlab.generation import GenerationConfig, generate_tokens

    model = model_for(name)
    prompt = [5, 17, 3, 42, 9, 11, 8]
    prompts = prompts_of([9, 3, 14], model.cfg.vocab_size)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0)
    budgets = lambda: generate_tokens(model, prompts, cfg, stop_ids=[prompts[1][0]], pad_id=0).tokens  # noqa: E731
    eager = [runtime.greedy(model, prompt, 16).tokens, runtime.greedy(model, prompt[:3], 20).tokens, budgets()]
    runtime.compile_model(model)
    if getattr(model, "_lmlab_step", None) is None:
        pytest.skip(f"torch.compile unavailable here: {runtime.NOTES[-1] if runtime.NOTES else ''}")
    try:
        assert runtime.greedy(model, prompt, 16).tokens == eager[0]
        assert runtime.greedy(model, prompt[:3], 20).tokens == eager[1]
        assert budgets() == eager[2]
        assert len({len(t) for t in eager[2]}) > 1 or len(set(map(tuple, eager[2]))) > 1

    finally:
        del model._lmlab_step
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_step_outside_inference_mode():
    """A user's own loop without inference mode still gets the compiled graph (int8 kernels have no
    gradient formula, so a graph traced for autograd would fail and fall back)."""
    from lmlab.quantize import quantize_model

    model = quantize_model(model_for("tiny-llama"), "int8")
    runtime.warm(model)
    runtime.compile_model(model)
    if getattr(model, "_lmlab_step", None) is None:
        pytest.skip(f"torch.compile unavailable here: {runtime.NOTES[-1] if runtime.NOTES else ''}")
    try:
        ids = torch.tensor([[5]])
        got = runtime.step(model, ids, model.make_cache(1, 8))
        assert getattr(model, "_lmlab_step", None) is not None, runtime.NOTES[-1:]
        with torch.no_grad():
            assert torch.allclose(got, model(ids, cache=model.make_cache(1, 8)), atol=1e-3)
    finally:
        model.__dict__.pop("_lmlab_step", None)
        torch._dynamo.reset()


# --------------------------------------------------------------------------- choices and fallbacks
def test_bfloat16_falls_back_with_a_named_notice(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "bf16_supported", lambda device="cpu": False)
    monkeypatch.setattr(runtime, "NOTES", [])
    assert runtime.resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32
    assert "bfloat16 is not supported on this CPU; falling back to float32" in capsys.readouterr().err


def test_missing_kernel_falls_back_to_reference_route(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "quantization_route", lambda scheme, device: "reference")
    monkeypatch.setattr(runtime, "NOTES", [])
    model = runtime.prepare(model_for("tiny-llama"), runtime.RunConfig(quantize="int4", group_size=32))
    assert "int4: no fast int4 kernel" in capsys.readouterr().err
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 9


def test_bad_choices_are_named():
    with pytest.raises(LmlabError, match="float8"):
        runtime.resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(LmlabError, match="int2"):
        runtime.prepare(model_for("tiny-llama"), runtime.RunConfig(quantize="int2"))
    with pytest.raises(LmlabError, match="threads"):
        runtime.set_threads(-1)


def test_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(runtime, "machine_threads", lambda: 8)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (5.2, 0.0, 0.0))
    assert runtime.idle_threads() == 3
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert runtime.idle_threads() == 1
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert runtime.idle_threads() == 8


def test_threads_follow_the_machine():
    before = torch.get_num_threads()
    try:
        n = runtime.set_threads()
        assert n == torch.get_num_threads() and 1 <= n <= runtime.machine_threads()
        assert runtime.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_greedy_stays_close_to_float(scheme):
    model = model_for("tiny-llama", d_model=128, n_head=4, n_kv_head=2, d_ff=256)
    prompt = [5, 17, 3, 42, 9, 11]
    want = runtime.greedy(model, prompt, 8).tokens
    q = runtime.prepare(model, runtime.RunConfig(quantize=scheme, group_size=32))
    got = runtime.greedy(q, prompt, 8).tokens
    assert got[:2] == want[:2]  # small random models have small margins: only the first tokens must agree


def test_row_linears_keep_weights_tied_and_results_close():
    model = model_for("tiny-llama").to(torch.bfloat16)
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        cache = model.make_cache(1, 8)
        model(ids[:, :5], cache=cache)
        want = model(ids[:, 5:], cache=cache).float()
        assert runtime.use_row_linears(model) == 9
        assert isinstance(model.lm_head, runtime.RowLinear) and model.lm_head.weight is model.tok_emb.weight
        cache = model.make_cache(1, 8)
        model(ids[:, :5], cache=cache)
        got = model(ids[:, 5:], cache=cache).float()
    assert (got - want).norm() / want.norm() < 2e-2
