"""Speculative decoding inside the one loop (lmlab.inference.drafting + generate_tokens): greedy output equals
the target's plain greedy output, sampling follows the target's distribution, edge cases, bad input."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.inference import drafting
from lmlab.inference import speculative as spec_mod
from lmlab.inference.drafting import Speculation, ensure_room
from lmlab.inference.compile import compile_step
from lmlab.inference.generate import generate_tokens
from lmlab.inference.runner import Runner
from lmlab.inference.sampling import GenerationConfig, probabilities, process_logits
from lmlab.model import KVCache, Transformer
from test_generation import margin_model, prompts_of

GREEDY = dict(temperature=0.0)


def run(model, prompts, cfg, speculation=None, stop_ids=(), on_token=None):
    return generate_tokens(model, prompts, cfg, stop_ids=list(stop_ids), pad_id=0, on_token=on_token,
                           speculation=speculation)


@pytest.fixture(scope="module")
def pair():
    """A target and two drafts over its vocabulary: a smaller random one (low acceptance) and the target
    itself (every draft accepted: long accepted runs, bonus tokens)."""
    target = margin_model("tiny-llama", seed=0)
    small = margin_model("tiny-llama", seed=1, n_layer=1)
    return target, small


def strategies(target, small):
    return {
        "small draft": Speculation(draft=small, k=3, adaptive=False),
        "self draft": Speculation(draft=target, k=4, adaptive=False),
        "self draft adaptive": Speculation(draft=target, k=4),
        "lookup": Speculation(prompt_lookup=2, k=3, adaptive=False),
    }


# --------------------------------------------------------------------------- greedy = plain greedy
@pytest.mark.parametrize("name", ["small draft", "self draft", "self draft adaptive", "lookup"])
def test_greedy_speculation_equals_plain_greedy_batched_and_one_by_one(pair, name):
    target, small = pair
    sp = strategies(target, small)[name]
    prompts = prompts_of([3, 11, 40], target.cfg.vocab_size) + [[5, 6, 7, 5, 6, 7, 5, 6]]
    cfg = GenerationConfig(max_new_tokens=24, **GREEDY)
    plain = run(target, prompts, cfg).tokens
    batched = run(target, prompts, cfg, sp)
    assert batched.tokens == plain
    assert [run(target, [p], cfg, sp).tokens[0] for p in prompts] == plain
    assert batched.spec.passes > 0
    if name.startswith("self"):
        assert batched.spec.acceptance_rate == 1.0


def test_greedy_with_repetition_penalty_counts_drafts_as_seen(pair):
    target, small = pair
    prompts = prompts_of([4, 9], target.cfg.vocab_size, seed=3)
    cfg = GenerationConfig(max_new_tokens=20, repetition_penalty=1.5, **GREEDY)
    plain = run(target, prompts, cfg).tokens
    for sp in (Speculation(draft=target, k=4, adaptive=False), Speculation(draft=small, k=2, adaptive=False)):
        out = run(target, prompts, cfg, sp)
        assert out.tokens == plain
    assert plain != run(target, prompts, GenerationConfig(max_new_tokens=20, **GREEDY)).tokens


# --------------------------------------------------------------------------- edge cases
def test_eos_inside_an_accepted_draft_cuts_there(pair):
    target, _ = pair
    prompt = prompts_of([6], target.cfg.vocab_size, seed=5)
    cfg = GenerationConfig(max_new_tokens=16, **GREEDY)
    free = run(target, prompt, cfg).tokens[0]
    eos = free[5]
    plain = run(target, prompt, cfg, stop_ids=[eos])
    out = run(target, prompt, cfg, Speculation(draft=target, k=8, adaptive=False), stop_ids=[eos])
    assert out.tokens == plain.tokens == [free[:free.index(eos)]]
    assert out.finish_reasons == ["eos"]
    assert out.spec.histogram.get(8, 0) + out.spec.histogram.get(7, 0) >= 1  # the eos came inside a long draft


def test_stop_by_on_token_inside_a_draft(pair):
    target, _ = pair
    prompt = prompts_of([6], target.cfg.vocab_size, seed=5)
    cfg = GenerationConfig(max_new_tokens=16, **GREEDY)
    seen = []

    def on_token(row, tok):
        seen.append(tok)
        return len(seen) == 3

    out = run(target, prompt, cfg, Speculation(draft=target, k=6, adaptive=False), on_token=on_token)
    assert out.finish_reasons == ["stop"]
    assert out.tokens[0] == seen == run(target, prompt, cfg).tokens[0][:3]


@pytest.mark.parametrize("max_new, k", [(5, 4), (3, 8), (1, 4), (2, 4)])
def test_budget_reached_mid_draft_and_k_beyond_the_budget(pair, max_new, k):
    target, _ = pair
    prompts = prompts_of([4, 7], target.cfg.vocab_size)
    cfg = GenerationConfig(max_new_tokens=max_new, **GREEDY)
    out = run(target, prompts, cfg, Speculation(draft=target, k=k, adaptive=False))
    assert out.tokens == run(target, prompts, cfg).tokens
    assert all(len(t) == max_new for t in out.tokens) and out.finish_reasons == ["length"] * 2


def test_context_window_reached(pair):
    target, small = pair
    window = target.cfg.max_seq_len
    prompts = prompts_of([window - 5, window - 9, 20], target.cfg.vocab_size)
    cfg = GenerationConfig(max_new_tokens=40, **GREEDY)
    plain = run(target, prompts, cfg).tokens
    assert [len(t) for t in plain] == [5, 9, 40]
    for sp in (Speculation(draft=target, k=6, adaptive=False), Speculation(draft=small, k=3, adaptive=False),
               Speculation(prompt_lookup=3, k=6, adaptive=False)):
        assert run(target, prompts, cfg, sp).tokens == plain


def test_rows_finishing_at_different_times(pair):
    target, small = pair
    prompts = prompts_of([5, 8, 12, 3], target.cfg.vocab_size, seed=7)
    cfg = GenerationConfig(max_new_tokens=30, **GREEDY)
    free = run(target, prompts, cfg).tokens
    stops = [free[0][2], free[2][10]]  # row 0 ends early, row 2 later, the others (maybe) run to the end
    plain = run(target, prompts, cfg, stop_ids=stops)
    assert len({len(t) for t in plain.tokens}) > 1
    for sp in (Speculation(draft=target, k=5, adaptive=False), Speculation(draft=small, k=2, adaptive=False)):
        out = run(target, prompts, cfg, sp, stop_ids=stops)
        assert out.tokens == plain.tokens and out.finish_reasons == plain.finish_reasons


def test_compaction_keeps_every_row_and_order():
    cache = KVCache(1, 2, 1, 8, 1)
    cache.append(4)
    cache.k[0][:, 0, :4, 0] = torch.tensor([[1., 2., 3., 4.], [5., 6., 7., 8.]])
    cache.truncate([2, 3])  # row 0 keeps 2 slots, row 1 keeps 3: length 3, a hole at slot 2 of row 0
    cache.append(3)
    cache.k[0][:, 0, 3:6, 0] = torch.tensor([[9., 10., 11.], [12., 13., 14.]])
    cache.truncate([5, 4])  # row 0: 1 2 _ 9 10, row 1: 5 6 7 12
    ensure_room(cache, 4)  # 5 + 4 > 8: the hole goes
    assert cache.length == 4 and cache.next_pos.tolist() == [4, 4]
    assert cache.k[0][0, 0, :4, 0].tolist() == [1., 2., 9., 10.]
    assert cache.k[0][1, 0, :4, 0].tolist() == [5., 6., 7., 12.]
    assert cache.valid[:, :4].all() and not cache.valid[:, 4:].any() and not cache.padded
    with pytest.raises(LmlabError, match="cannot hold 13"):
        ensure_room(cache, 9)


def test_adaptive_controller_switches_a_useless_draft_off_and_says_so(pair):
    target, small = pair
    prompts = prompts_of([5], target.cfg.vocab_size)
    cfg = GenerationConfig(max_new_tokens=60, **GREEDY)
    out = run(target, prompts, cfg, Speculation(draft=small, k=4))
    assert out.tokens == run(target, prompts, cfg).tokens
    assert out.spec.acceptance_rate < 0.3
    assert out.spec.plain_steps > out.spec.passes  # most steps were plain once it switched off
    assert "expected speed-up" in out.spec.switched_off
    assert "speculation switched off" in out.spec.format(100.0)


def test_adaptive_k_keeps_batched_verification_on_the_compiled_step(pair, monkeypatch):
    """With a compiled target the adaptive controller drafts at most as many tokens as keep a verification pass
    (batch x (k+1) rows) inside what the compiled few-token step takes; eager targets keep k, and so do batches
    whose every pass is beyond it."""
    import lmlab.inference.generate as generate_mod

    target, _ = pair

    class Step:  # a compiled step that takes up to 16 rows; every call here still runs eagerly
        failed, few_rows = False, 16

        def covers(self, B, T):
            return False

        def add_few(self):
            pass

    compiled = Runner(target, Step())
    assert [drafting.compiled_k_max(compiled, b, 6) for b in (1, 2, 4, 8, 9)] == [6, 6, 3, 1, 6]
    assert drafting.compiled_k_max(Runner(target), 4, 6) == 6
    seen = []
    real = generate_mod.DraftController
    monkeypatch.setattr(generate_mod, "DraftController", lambda k_max: seen.append(k_max) or real(k_max))
    prompts = prompts_of([3, 11, 40, 7], target.cfg.vocab_size)
    cfg = GenerationConfig(max_new_tokens=8, **GREEDY)
    assert run(compiled, prompts, cfg, Speculation(prompt_lookup=2, k=6)).tokens == run(target, prompts, cfg).tokens
    assert seen == [3]


# --------------------------------------------------------------------------- sampling is lossless
def tiny_pair():
    target = margin_model("tiny-llama", seed=11, vocab_size=10)
    draft = margin_model("tiny-llama", seed=12, vocab_size=10, n_layer=1)
    with torch.no_grad():
        draft.lm_head.weight.mul_(2.5)  # a sharper, deliberately different draft
    return target, draft


@torch.inference_mode()
def exact_joint(model, prompt: list[int], cfg: GenerationConfig, n: int = 3) -> dict[tuple, float]:
    """P(t1..tn) under plain sampling from the model's processed distribution, by enumeration."""
    V = model.cfg.vocab_size
    joint = {(): 1.0}
    for _ in range(n):
        prefixes = list(joint)
        ids = torch.tensor([prompt + list(p) for p in prefixes])
        probs = probabilities(process_logits(model(ids)[:, -1].float(), cfg), cfg)
        joint = {p + (t,): joint[p] * float(probs[i, t]) for i, p in enumerate(prefixes) for t in range(V)}
    return joint


def chi_square_p(samples: list[list[int]], joint: dict[tuple, float]) -> float:
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[tuple(s[:3])] = counts.get(tuple(s[:3]), 0) + 1
    n = len(samples)
    big = [c for c in joint if joint[c] * n >= 5]
    small = [c for c in joint if joint[c] * n < 5]
    observed = [counts.get(c, 0) for c in big] + [sum(counts.get(c, 0) for c in small)]
    expected = [joint[c] * n for c in big] + [sum(joint[c] for c in small) * n]
    assert sum(observed) == n
    expected = [e * n / sum(expected) for e in expected]  # float32 probabilities: renormalise the rounding
    return float(chisquare(observed, expected).pvalue)


N_SAMPLES = 20000
SAMPLING = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9)]


def speculative_samples(target, draft, knobs, seed=0):
    prompt = [3, 7, 1, 4]
    cfg = GenerationConfig(max_new_tokens=4, seed=seed, **knobs)  # 1 plain token, then one pass of k=2
    out = run(target, [prompt] * N_SAMPLES, cfg, Speculation(draft=draft, k=2, adaptive=False))
    assert out.spec.passes >= 1 and 0 < out.spec.acceptance_rate < 0.95
    return out.tokens, exact_joint(target, prompt, cfg)


@pytest.mark.parametrize("knobs", SAMPLING, ids=["t1", "t0.7-p0.9"])
def test_speculative_sampling_follows_the_target_distribution(knobs):
    target, draft = tiny_pair()
    samples, joint = speculative_samples(target, draft, knobs)
    assert chi_square_p(samples, joint) > 0.01
    # control: the draft's own distribution is far from the target's
    draft_joint = exact_joint(draft, [3, 7, 1, 4], GenerationConfig(**knobs))
    assert sum(abs(joint[c] - draft_joint[c]) for c in joint) > 0.3


def test_the_chi_square_test_catches_a_wrong_residual(monkeypatch):
    """The same run with the residual replaced by the target's own distribution is detected."""
    monkeypatch.setattr(spec_mod, "_residual", lambda p, q: p / p.sum(-1, keepdim=True))
    target, draft = tiny_pair()
    samples, joint = speculative_samples(target, draft, SAMPLING[0])
    assert chi_square_p(samples, joint) < 1e-6


def test_sampling_with_a_narrowed_draft_head_follows_the_target_distribution():
    """A draft that scores only 6 of the 10 ids (q = 0 on the rest): the target's tokens outside them come
    from the residual alone, and the joint distribution is still the target's."""
    target, draft = tiny_pair()
    ids = drafting.narrow_head(draft, 5, extra_ids=[9])
    assert ids.tolist() == [0, 1, 2, 3, 4, 9] and draft.lm_head.weight.shape == (6, draft.cfg.d_model)
    prompt, knobs = [3, 7, 1, 4], SAMPLING[0]
    cfg = GenerationConfig(max_new_tokens=4, seed=0, **knobs)
    out = run(target, [prompt] * N_SAMPLES, cfg, Speculation(draft=draft, k=2, adaptive=False, draft_vocab=ids))
    assert out.spec.passes >= 1 and 0 < out.spec.acceptance_rate < 0.95
    drafted = {t for row in out.tokens for t in row}
    assert drafted - set(ids.tolist()), "the target still makes the ids the draft cannot"
    assert chi_square_p(out.tokens, exact_joint(target, prompt, cfg)) > 0.01


def test_narrowed_draft_head_keeps_greedy_output_and_the_kept_logits(pair):
    import copy

    target, small = pair
    narrow = copy.deepcopy(small)
    ids = drafting.narrow_head(narrow, 200, extra_ids=[511, 7, None])
    assert len(ids) == 201 and ids[-1] == 511
    x = torch.tensor([[5, 9, 300, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(narrow(x)[0], small(x)[0][:, ids], rtol=0, atol=0)
    prompts = prompts_of([3, 11, 40], target.cfg.vocab_size)
    cfg = GenerationConfig(max_new_tokens=24, **GREEDY)
    plain = run(target, prompts, cfg).tokens
    narrowed = run(target, prompts, cfg, Speculation(draft=narrow, k=3, adaptive=False, draft_vocab=ids))
    assert narrowed.tokens == plain and narrowed.spec.passes > 0
    # the target itself, narrowed to 64 ids + every id it emits here, still proposes exactly its own tokens
    own = copy.deepcopy(target)
    emitted = sorted({t for row in plain for t in row})
    own_ids = drafting.narrow_head(own, 64, extra_ids=emitted)
    assert max(emitted) >= 64 and len(own_ids) < target.cfg.vocab_size
    selfish = run(target, prompts, cfg, Speculation(draft=own, k=3, adaptive=False, draft_vocab=own_ids))
    assert selfish.tokens == plain and selfish.spec.acceptance_rate == 1.0
    with pytest.raises(LmlabError, match="--draft-vocab 512 must be between 1 and 511"):
        drafting.narrow_head(copy.deepcopy(small), 512)
    with pytest.raises(LmlabError, match="--draft-vocab 0 must be"):
        drafting.narrow_head(copy.deepcopy(small), 0)
    with pytest.raises(LmlabError, match="needs a draft model"):
        Speculation(prompt_lookup=2, draft_vocab=ids)


# --------------------------------------------------------------------------- bad input
def test_bad_speculation_input_is_named(pair):
    target, _ = pair
    with pytest.raises(LmlabError, match="k=0"):
        Speculation(draft=target, k=0)
    with pytest.raises(LmlabError, match="k=-2"):
        Speculation(prompt_lookup=3, k=-2)
    with pytest.raises(LmlabError, match="not both"):
        Speculation(draft=target, prompt_lookup=3)
    other = margin_model("tiny-llama", seed=2, vocab_size=300)
    with pytest.raises(LmlabError, match=r"vocabulary 300 .*target 512"):
        run(target, [[1, 2]], GenerationConfig(max_new_tokens=3), Speculation(draft=other, draft_name="other"))
    encoder = torch.nn.Linear(1, 1)
    encoder.cfg = preset("bert-base")  # only its config is read before the refusal
    with pytest.raises(LmlabError, match="draft enc is an encoder model"):
        run(target, [[1, 2]], GenerationConfig(max_new_tokens=3), Speculation(draft=encoder, draft_name="enc"))


def test_vocab_mismatch_names_both_tokenizers():
    class Tok:
        def __init__(self, vocab, eos):
            self.vocab_size, self.eos_id = vocab, eos

        def encode(self, text, add_special_tokens=False):
            return list(text.encode())[: self.vocab_size % 7 + 3]

    a, b = margin_model("tiny-llama", seed=0), margin_model("tiny-llama", seed=0)
    with pytest.raises(LmlabError, match=r"draft d has vocabulary 512 \(tokenizer 300 entries, eos id 2.*"
                                         r"target t 512 \(tokenizer 512 entries, eos id 0"):
        drafting.check_pair(a.cfg, b.cfg, Tok(512, 0), Tok(300, 2), draft_name="d", target_name="t")


def test_cli_options_conflict_and_k(pair):
    from lmlab.inference.load import load_speculation
    from lmlab.inference.runner import Runner

    target, _ = pair
    with pytest.raises(LmlabError, match="not both"):
        load_speculation(Runner(target), None, draft="x", prompt_lookup=3)
    with pytest.raises(LmlabError, match="k=0"):
        load_speculation(Runner(target), None, prompt_lookup=3, speculate=0)
    with pytest.raises(LmlabError, match="--speculate needs"):
        load_speculation(Runner(target), None, speculate=3)
    assert load_speculation(Runner(target), None) is None
    assert load_speculation(Runner(target), None, prompt_lookup=3).k == drafting.DEFAULT_K


# --------------------------------------------------------------------------- real models (slow)
@pytest.mark.slow
def test_compiled_verification_passes_give_the_plain_tokens(pair):
    """A compiled target (its verification passes through the few-token step: the ahead-of-time package at
    batch 1, torch.compile for the batch) drafting for itself and by prompt lookup: plain greedy tokens."""
    target, _ = pair
    step = compile_step(target, few=True)
    if step is None:
        pytest.skip("torch.compile unavailable here")
    try:
        few, calls = step.aot.get("few"), []
        assert few is not None
        step.aot["few"] = lambda *a: calls.append(a[0].shape[1]) or few(*a)
        step.few_rows = 16  # every verification pass compiled, whichever was faster here
        runner = Runner(target, step)
        prompts = prompts_of([3, 11, 40], target.cfg.vocab_size) + [[5, 6, 7, 5, 6, 7, 5, 6]]
        cfg = GenerationConfig(max_new_tokens=20, **GREEDY)
        plain = run(target, prompts, cfg).tokens
        for sp in (Speculation(draft=runner, k=4, adaptive=False), Speculation(prompt_lookup=2, k=6, adaptive=False)):
            assert run(runner, prompts, cfg, sp).tokens == plain
            assert [run(runner, [p], cfg, sp).tokens[0] for p in prompts] == plain
        assert runner.compiled and calls and max(calls) > 2
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_bfloat16_passes_equal_one_token_steps_bit_for_bit():
    """In bfloat16 the compiled one-token step and the compiled few-token pass give the same logits at every
    position, bit for bit (batch 1: the two ahead-of-time packages; batch 2: torch.compile), so greedy
    verification accepts exactly what plain decoding would emit. Products take lmlab's native kernel, whose
    rows do not depend on how many rows a call has; the compiled code must round 16-bit values at the same
    places in both graphs (lmlab.inference.compile.INDUCTOR_CONFIG)."""
    from lmlab.inference import native
    from lmlab.inference.kernels import RowLinear, use_row_linears

    if not native.available():
        pytest.skip("lmlab's native kernels are not built here")
    torch.manual_seed(0)  # SmolLM2's widths and 6 layers: there the two graphs fused (and rounded) differently
    model = Transformer(preset("tiny-llama", d_model=576, n_head=9, n_kv_head=3, head_dim=64, d_ff=1536,
                               n_layer=6)).to(torch.bfloat16).eval()
    use_row_linears(model)
    for m in model.modules():
        if isinstance(m, RowLinear):
            m.set_route("native", "native", ("native", "native"))
    step = compile_step(model, few=True)
    if step is None:
        pytest.skip("torch.compile unavailable here")
    try:
        assert step.aot.get("one") is not None and step.aot.get("few") is not None
        step.few_rows = 16
        runner = Runner(model, step)
        gen = torch.Generator().manual_seed(0)
        for B in (1, 2):
            prompt = torch.randint(0, model.cfg.vocab_size, (B, 9), generator=gen)
            new = torch.randint(0, model.cfg.vocab_size, (B, 5), generator=gen)
            one, few = runner.new_cache(B, 40), runner.new_cache(B, 40)
            runner.prefill(prompt, one), runner.prefill(prompt, few)
            steps = torch.stack([runner.step(new[:, i:i + 1], one) for i in range(5)], 1)
            assert torch.equal(runner.logits_all(new, few), steps)
        assert runner.compiled
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_smollm2_prompt_lookup_equals_plain_greedy(smollm2):
    model, tok = smollm2
    text = ("def area(width, height):\n    return width * height\n\n"
            "def perimeter(width, height):\n    return 2 * (width + height)\n\n"
            "# the same functions again, documented\ndef area(width, height):\n")
    prompts = [tok.encode(text), tok.encode("The cat sat on the mat. The dog sat on the log. The cat sat on")]
    cfg = GenerationConfig(max_new_tokens=32, **GREEDY)
    plain = generate_tokens(model, prompts, cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id).tokens
    sp = Speculation(prompt_lookup=3, k=4, adaptive=False)
    out = generate_tokens(model, prompts, cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id, speculation=sp)
    assert out.tokens == plain
    assert out.spec.acceptance_rate > 0.3


def qwen_pair_dir() -> Path | None:
    """The Qwen draft/target pair: $LMLAB_QWEN_PAIR, else ../qwen beside the checkout (where
    `../shared/tools/get-qwen-pair.sh ../qwen` puts them)."""
    root = Path(__file__).resolve().parents[2]
    folder = Path(os.environ.get("LMLAB_QWEN_PAIR", root.parent / "qwen"))
    names = ("qwen2.5-coder-0.5b.gguf", "qwen2.5-coder-1.5b.gguf")
    return folder if all((folder / n).is_file() for n in names) else None


@pytest.mark.slow
def test_qwen_pair_greedy_speculation_equals_plain():
    folder = qwen_pair_dir()
    if folder is None:
        pytest.skip("the Qwen pair is absent (set LMLAB_QWEN_PAIR or run ../shared/tools/get-qwen-pair.sh ../qwen)")
    from lmlab.inference.load import RunConfig, load, load_speculation

    run_cfg = RunConfig(threads=1)
    target, tok = load(str(folder / "qwen2.5-coder-1.5b.gguf"), run_cfg)
    sp = load_speculation(target, tok, draft=str(folder / "qwen2.5-coder-0.5b.gguf"), speculate=4, adapt=False,
                          run=run_cfg)
    prompts = [tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")]
    cfg = GenerationConfig(max_new_tokens=12, **GREEDY)
    plain = generate_tokens(target, prompts, cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id).tokens
    out = generate_tokens(target, prompts, cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id, speculation=sp)
    assert out.tokens == plain
    assert out.spec.acceptance_rate > 0.3



# --------------------------------------------------------------------------- the command line
def lmlab_cli(capsys, monkeypatch, *args, stdin=""):
    """`lmlab ARGS` in this process (subprocesses cost seconds each): (exit code, stdout, stderr)."""
    import io

    from lmlab.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as ended:
        main(list(args))
    out = capsys.readouterr()
    return ended.value.code, out.out, out.err


def test_cli_draft_and_prompt_lookup_with_run_options(tmp_path, capsys, monkeypatch):
    from tiny_gguf import write_tiny

    tiny = tmp_path / "tiny.gguf"
    write_tiny(tiny)
    base = ["generate", "-m", str(tiny), "-p", "The quick brown fox. The quick", "--max-new-tokens", "8",
            "--temperature", "0", "--threads", "1"]
    code, plain, err = lmlab_cli(capsys, monkeypatch, *base)
    assert code == 0, err
    for opts in (["--draft", str(tiny), "--speculate", "3", "--no-adapt"], ["--prompt-lookup", "2"],
                 ["--draft", str(tiny), "--draft-quantize", "int4", "--speculate", "3", "--no-adapt"],
                 ["--draft", str(tiny), "--draft-vocab", "40", "--speculate", "3", "--no-adapt"],
                 ["--draft", str(tiny), "--quantize", "int8", "--dtype", "bfloat16"]):
        code, out, err = lmlab_cli(capsys, monkeypatch, *base, "--stats", *opts)
        assert code == 0, (opts, err)
        assert "acceptance rate" in err and "tokens per pass" in err, opts
        if "--quantize" not in opts:  # a quantized draft changes which drafts are accepted, not the output
            assert out == plain, opts
    code, out, err = lmlab_cli(capsys, monkeypatch, "chat", "-m", str(tiny), "--prompt-lookup", "2",
                               "--max-new-tokens", "4", "--temperature", "0", "--stats", stdin="hello\n")
    assert code == 0 and "acceptance rate" in err, err
    for opts, needle in ((["--draft", str(tiny), "--prompt-lookup", "2"], "not both"),
                         (["--prompt-lookup", "2", "--speculate", "0"], "k=0"),
                         (["--draft-quantize", "int4"], "--draft-quantize needs --draft"),
                         (["--prompt-lookup", "2", "--draft-quantize", "int8"], "--draft-quantize needs --draft"),
                         (["--prompt-lookup", "2", "--draft-vocab", "40"], "--draft-vocab needs --draft"),
                         (["--draft", str(tiny), "--draft-vocab", "100000"], "--draft-vocab 100000 must be between")):
        code, out, err = lmlab_cli(capsys, monkeypatch, *base, *opts)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 1 and len(lines) == 1 and needle in lines[0], err
