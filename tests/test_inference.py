"""Running a model: dtype/quantization choice with named fallbacks, threads, chunked prefill, the decoding
loop against a cache-free reference, cached decoding against a full forward, compiled against eager."""
from __future__ import annotations

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.inference import load as loading
from lmlab.inference.compile import compile_step
from lmlab.inference.generate import generate_tokens
from lmlab.inference.kernels import RowLinear, use_row_linears
from lmlab.inference.load import RunConfig, prepare
from lmlab.inference.quantize import QuantLinear, quantize_model
from lmlab.inference.runner import Runner
from lmlab.inference.sampling import GenerationConfig
from lmlab.model import Transformer
from lmlab.utils import device as devices
from test_generation import margin_model as model_for  # random weights whose logits depend on context
from test_generation import prompts_of


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """No cache at all: the whole sequence again for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def greedy(model, prompt: list[int], n: int, chunk: int = 512):
    """The decoding loop, greedy, exactly n tokens."""
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    return generate_tokens(model, [prompt], cfg, stop_ids=[], pad_id=0, chunk=chunk)


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


# --------------------------------------------------------------------------- prefill and the decoding loop
def test_chunked_prefill_equals_one_pass():
    model = model_for("tiny-llama")
    runner = Runner(model)
    ids = torch.randint(0, 512, (1, 40))
    cache1, cache2 = runner.new_cache(1, 44), runner.new_cache(1, 44)
    one = runner.prefill(ids, cache1, chunk=512)
    chunked = runner.prefill(ids, cache2, chunk=16)
    assert (one - chunked).abs().max() <= 1e-5
    assert cache1.length == cache2.length == 40
    assert max((a - b).abs().max() for a, b in zip(cache1.k, cache2.k)) <= 1e-5


@pytest.mark.parametrize("name", ["tiny-llama", "baby-gpt"])
def test_greedy_loop_equals_reference_tokens_float32(name):
    model = model_for(name)
    prompt = [5, 17, 3, 42, 9, 11]
    n = 20 if name == "tiny-llama" else 12
    result = greedy(model, prompt, n, chunk=4)
    assert result.tokens[0] == reference_greedy(model, prompt, n)
    assert len(set(result.tokens[0])) >= 2  # the model does not just repeat one token, so equality means something
    assert result.timing.decode_tokens == n and result.timing.decode_tokens_per_s > 0


def test_encoder_only_model_has_no_cache():
    model = model_for("bert-base", n_layer=1, d_model=32, n_head=2, d_ff=64, vocab_size=100)
    with pytest.raises(LmlabError, match="encoder-only"):
        model.make_cache(1, 8)


def test_positions_past_the_window_are_a_clear_error():
    model = model_for("tiny-llama", max_seq_len=16)
    with pytest.raises(LmlabError, match="context window is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.make_cache(1, 32)
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(LmlabError, match="17 positions requested"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)


@pytest.mark.slow
@pytest.mark.parametrize("name, scheme", [("tiny-llama", None), ("baby-gpt", None), ("tiny-llama", "int4")])
def test_compiled_decoding_gives_the_eager_tokens(name, scheme):
    """The compiled step (static cache, mask from validity) against the eager forward: one prompt at two
    lengths (two cache sizes, one graph; batch 1 runs the ahead-of-time package) and a left-padded batch
    (torch.compile) whose rows finish at different steps."""
    model = model_for(name)
    if scheme:
        quantize_model(model, scheme)
        Runner(model).warm()
    prompt = [5, 17, 3, 42, 9, 11, 8]
    prompts = prompts_of([9, 3, 14], model.cfg.vocab_size)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0)

    def tokens(runner):
        return [greedy(runner, prompt, 16).tokens, greedy(runner, prompt[:3], 20).tokens,
                generate_tokens(runner, prompts, cfg, stop_ids=[prompts[1][0]], pad_id=0).tokens]

    eager = tokens(Runner(model))
    step = compile_step(model)
    if step is None:
        pytest.skip(f"torch.compile unavailable here: {devices.NOTES[-1] if devices.NOTES else ''}")
    try:
        runner = Runner(model, step)
        assert step.aot.get("one") is not None, devices.NOTES[-1:]
        assert tokens(runner) == eager
        assert runner.compiled, devices.NOTES[-1:]
        assert len({len(t) for t in eager[2]}) > 1 or len(set(map(tuple, eager[2]))) > 1
        assert not [k for k in vars(model) if "step" in k or k.startswith("_lmlab")]  # nothing hung on the model
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_few_token_step_gives_the_eager_logits():
    """Verification passes of T = 2..16 tokens through the compiled step (batch 1: the few-token ahead-of-time
    package; a left-padded batch of 2 with a padding query: torch.compile) against the eager forward, every
    position, causal order inside the T new tokens included."""
    model = model_for("tiny-llama")
    step = compile_step(model, few=True)
    if step is None:
        pytest.skip(f"torch.compile unavailable here: {devices.NOTES[-1] if devices.NOTES else ''}")
    try:
        assert step.aot.get("few") is not None, devices.NOTES[-1:]
        assert set(step.few_timings) <= {2, 4, 8, 16} and 1 <= step.few_rows <= 16  # measured where eager wins
        step.few_rows = 16  # every count through the compiled step, whichever was faster here
        runner, eager = Runner(model, step), Runner(model)
        gen = torch.Generator().manual_seed(0)
        for B in (1, 2):
            prompt = torch.randint(0, model.cfg.vocab_size, (B, 7), generator=gen)
            caches = model.make_cache(B, 48), model.make_cache(B, 48)
            for r, c in zip((eager, runner), caches):
                r.prefill(prompt, c)
            for T in (2, 5, 16, 3):
                ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=gen)
                mask = None if B == 1 else torch.ones(B, T, dtype=torch.bool).index_fill_(1, torch.tensor([0]), False)
                mask = None if mask is None else mask | (torch.arange(B) == 0)[:, None]  # row 1 starts with a pad
                want, got = (r.logits_all(ids, c, mask) for r, c in zip((eager, runner), caches))
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                for c in caches:
                    c.truncate(c.length - T // 2)  # keep part of the pass, as a verdict does
        assert runner.compiled, devices.NOTES[-1:]
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_step_outside_inference_mode():
    """A user's own loop without inference mode still gets the compiled graph (int8 kernels have no
    gradient formula, so a graph traced for autograd would fail and fall back)."""
    model = quantize_model(model_for("tiny-llama"), "int8")
    Runner(model).warm()
    step = compile_step(model)
    if step is None:
        pytest.skip(f"torch.compile unavailable here: {devices.NOTES[-1] if devices.NOTES else ''}")
    try:
        runner = Runner(model, step)
        ids = torch.tensor([[5]])
        got = runner.step(ids, model.make_cache(1, 8))
        assert runner.compiled, devices.NOTES[-1:]
        with torch.no_grad():
            assert torch.allclose(got, model(ids, cache=model.make_cache(1, 8))[:, -1], atol=1e-3)
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- choices and fallbacks
def test_bfloat16_falls_back_with_a_named_notice(monkeypatch, capsys):
    monkeypatch.setattr(devices, "bf16_supported", lambda device="cpu": False)
    monkeypatch.setattr(devices, "NOTES", [])
    runner = prepare(model_for("tiny-llama"), RunConfig(dtype="bfloat16", threads=1))
    assert runner.model.tok_emb.weight.dtype == torch.float32
    assert "bfloat16 is not supported on this CPU; falling back to float32" in capsys.readouterr().err


def test_missing_kernel_falls_back_to_reference_route(monkeypatch, capsys):
    monkeypatch.setattr(loading, "quantization_route", lambda scheme, device: "reference")
    monkeypatch.setattr(devices, "NOTES", [])
    runner = prepare(model_for("tiny-llama"), RunConfig(quantize="int4", group_size=32, threads=1))
    assert "int4: no fast int4 kernel" in capsys.readouterr().err
    assert sum(isinstance(m, QuantLinear) for m in runner.model.modules()) == 9


def test_bad_choices_are_named():
    with pytest.raises(LmlabError, match="float8"):
        prepare(model_for("tiny-llama"), RunConfig(dtype="float8", threads=1))
    with pytest.raises(LmlabError, match="int2"):
        prepare(model_for("tiny-llama"), RunConfig(quantize="int2", threads=1))
    with pytest.raises(LmlabError, match="threads"):
        prepare(model_for("tiny-llama"), RunConfig(threads=-1))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_greedy_stays_close_to_float(scheme):
    model = model_for("tiny-llama", d_model=128, n_head=4, n_kv_head=2, d_ff=256)
    prompt = [5, 17, 3, 42, 9, 11]
    want = greedy(model, prompt, 8).tokens[0]
    runner = prepare(model, RunConfig(quantize=scheme, group_size=32, threads=1))
    got = greedy(runner, prompt, 8).tokens[0]
    assert got[:2] == want[:2]  # small random models have small margins: only the first tokens must agree


def test_row_linears_share_parameters_and_results_stay_close():
    model = model_for("tiny-llama").to(torch.bfloat16)
    ids = torch.randint(0, 512, (1, 6))
    params = {name: p for name, p in model.named_parameters()}
    with torch.no_grad():
        cache = model.make_cache(1, 8)
        model(ids[:, :5], cache=cache)
        want = model(ids[:, 5:], cache=cache).float()
        assert use_row_linears(model) == 9
        assert isinstance(model.lm_head, RowLinear) and model.lm_head.weight is model.tok_emb.weight
        assert all(p is params[name] for name, p in model.named_parameters())  # the same Parameters, swapped in
        cache = model.make_cache(1, 8)
        model(ids[:, :5], cache=cache)
        got = model(ids[:, 5:], cache=cache).float()
    assert (got - want).norm() / want.norm() < 2e-2
