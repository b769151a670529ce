import random

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.inference import speculative as spec
from lmlab.inference.speculative import (PAD, DraftController, PromptLookup, SpecStats, best_k, pad_drafts,
                                         prompt_lookup, prompt_lookup_batch, speedup, verify, verify_greedy)


def one_hot(index: int, v: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), v).float()


def expand(dist: torch.Tensor, b: int, n: int) -> torch.Tensor:
    return dist.expand(b, n, dist.shape[-1]).clone()


# --------------------------------------------------------------------------- verify: fixed cases
def test_drafts_equal_to_target_are_always_accepted_and_bonus_comes_from_position_k():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    target = torch.stack([p, p, p, one_hot(2, 4)])[None].expand(5, 4, 4).clone()
    drafts = torch.tensor([[0, 1, 3], [3, 3, 3], [1, 2, 0], [0, 0, 0], [2, 1, 3]])
    out = verify(target, expand(p, 5, 3), drafts, torch.Generator().manual_seed(0))
    assert out.accepted.tolist() == [3] * 5
    assert torch.equal(out.tokens, torch.cat([drafts, torch.full((5, 1), 2)], dim=1))
    assert out.counts.tolist() == [4] * 5


def test_drafts_the_target_rules_out_are_never_accepted():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = one_hot(3, 4)
    g = torch.Generator().manual_seed(1)
    out = verify(expand(p, 400, 3), expand(q, 400, 2), torch.full((400, 2), 3), g)
    assert out.accepted.tolist() == [0] * 400
    assert set(out.tokens[:, 0].tolist()) == {0, 1}  # the residual keeps p's support
    assert (out.tokens[:, 1:] == PAD).all()
    assert out.rows()[0] == [out.tokens[0, 0].item()]


def test_rows_stop_at_their_first_rejection():
    v = 4
    certain, impossible = one_hot(1, v), one_hot(0, v)
    target = torch.stack([
        torch.stack([certain, certain, one_hot(3, v)]),  # both drafts (1, 1) accepted, bonus 3
        torch.stack([certain, impossible, certain]),  # draft 1 accepted, draft 1 at position 1 rejected -> 0
        torch.stack([impossible, certain, certain]),  # rejected at once -> 0
    ])
    drafts = torch.tensor([[1, 1], [1, 1], [1, 1]])
    out = verify(target, expand(one_hot(1, v), 3, 2), drafts, torch.Generator().manual_seed(2))
    assert out.accepted.tolist() == [2, 1, 0]
    assert out.rows() == [[1, 1, 3], [1, 0], [0]]


def test_ragged_lengths_take_the_bonus_after_each_rows_own_drafts():
    v = 5
    target = torch.stack([one_hot(2, v), one_hot(2, v), one_hot(4, v)])[None].expand(3, 3, v).clone()
    target[0, 1] = one_hot(3, v)  # row 0 has one draft: its bonus is position 1
    drafts, lengths = pad_drafts([[2], [2, 2], []])
    assert lengths.tolist() == [1, 2, 0] and drafts.tolist() == [[2, 0], [2, 2], [0, 0]]
    q = expand(one_hot(2, v), 3, 2)
    out = verify(target, q, drafts, torch.Generator().manual_seed(3), lengths=lengths)
    assert out.rows() == [[2, 3], [2, 2, 4], [2]]
    assert verify(target, None, drafts, torch.Generator(), lengths=lengths).rows() == [[2, 3], [2, 2, 4], [2]]


def test_zero_drafts_sample_from_the_target():
    out = verify(one_hot(3, 6)[None, None].expand(2, 1, 6), torch.zeros(2, 0, 6),
                 torch.zeros(2, 0, dtype=torch.long))
    assert out.rows() == [[3], [3]]


def test_same_seed_same_verdict():
    torch.manual_seed(0)
    p = torch.rand(64, 4, 10).softmax(-1)
    q = torch.rand(64, 3, 10).softmax(-1)
    drafts = torch.randint(0, 10, (64, 3))
    a = verify(p, q, drafts, torch.Generator().manual_seed(9))
    b = verify(p, q, drafts, torch.Generator().manual_seed(9))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.accepted, b.accepted)


def test_half_precision_probabilities_are_verified_in_float32():
    p, q = PAIRS[0]
    drafts = torch.multinomial(q.expand(4000, -1), 1, replacement=True, generator=torch.Generator().manual_seed(3))
    out = verify(expand(p, 4000, 2).bfloat16(), expand(q, 4000, 1).bfloat16(), drafts,
                 torch.Generator().manual_seed(4))
    assert out.tokens.dtype == torch.long and ((out.tokens[:, 0] >= 0) & (out.tokens[:, 0] < 8)).all()
    assert 0 < out.accepted.sum() < 4000


def test_bad_shapes_are_lmlab_errors():
    p = torch.rand(2, 4, 8).softmax(-1)
    with pytest.raises(LmlabError, match="target_probs"):
        verify(p, None, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(LmlabError, match="draft_probs"):
        verify(p, torch.rand(2, 3, 7), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(LmlabError, match="lengths"):
        verify(p, None, torch.zeros(2, 3, dtype=torch.long), lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(LmlabError, match="target_logits"):
        verify_greedy(p[0], torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- verify: the distribution
def chi_square_p_value(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """p-value of `tokens` being drawn from p; tokens outside p's support fail outright."""
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    support = p > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = tokens.numel() * p[support].double()
    assert expected.min() >= 5, "too few samples for a chi-square test"
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = torch.tensor(float(support.sum() - 1), dtype=torch.float64)
    return torch.special.gammaincc(df / 2, stat / 2).item()


PAIRS = [  # (p, q): target and a deliberately different draft distribution
    (torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.07, 0.05, 0.03]),
     torch.tensor([0.03, 0.05, 0.07, 0.10, 0.10, 0.15, 0.20, 0.30])),
    # p rules out the last 4 tokens that q likes; q under-weights the first 6
    (torch.cat([torch.full((12,), 1 / 12), torch.zeros(4)]),
     torch.cat([torch.full((6,), 0.02), torch.full((6,), 0.08), torch.full((4,), 0.1)])),
]


def draft_and_verify(p: torch.Tensor, q: torch.Tensor, rows: int, k: int, seed: int) -> spec.Verdict:
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q.expand(rows * k, -1), 1, replacement=True, generator=g).view(rows, k)
    return verify(expand(p, rows, k + 1), expand(q, rows, k), drafts, g)


@pytest.mark.parametrize("pair", [0, 1])
def test_every_emitted_position_follows_the_target(pair):
    p, q = PAIRS[pair]
    out = draft_and_verify(p, q, 40_000, 2, seed=100 + pair)
    assert 0 < out.accepted.float().mean() < 2  # both rejections and bonus tokens happened
    for pos in range(3):
        emitted = out.tokens[out.counts > pos, pos]
        assert emitted.numel() >= 2_000
        assert chi_square_p_value(emitted, p) > 0.01, f"position {pos}"


@pytest.mark.parametrize("pair", [0, 1])
def test_sampling_the_replacement_from_p_instead_of_the_residual_is_caught(pair, monkeypatch):
    p, q = PAIRS[pair]
    monkeypatch.setattr(spec, "_residual", lambda p, q: p / p.sum(-1, keepdim=True))
    out = draft_and_verify(p, q, 40_000, 2, seed=100 + pair)
    assert chi_square_p_value(out.tokens[:, 0], p) < 1e-6


def test_deterministic_drafts_count_as_one_hot_q():
    p = PAIRS[0][0]
    g = torch.Generator().manual_seed(7)
    rows = 30_000
    drafts = torch.randint(0, 8, (rows, 3), generator=g)  # any fixed guesses, e.g. from prompt lookup
    lengths = torch.randint(0, 4, (rows,), generator=g)
    out = verify(expand(p, rows, 4), None, drafts, g, lengths=lengths)
    assert (out.accepted <= lengths).all()
    assert chi_square_p_value(out.tokens[:, 0], p) > 0.01
    kept = out.accepted > 0  # an accepted guess t was emitted with probability p(t) for that row
    assert torch.equal(out.tokens[kept, 0], drafts[kept, 0])


def test_one_hot_drafts_without_the_residual_are_caught(monkeypatch):
    p = PAIRS[0][0]
    monkeypatch.setattr(spec, "_residual", lambda p, q: p / p.sum(-1, keepdim=True))
    out = verify(expand(p, 30_000, 2), None, torch.zeros(30_000, 1, dtype=torch.long),
                 torch.Generator().manual_seed(7))
    assert chi_square_p_value(out.tokens[:, 0], p) < 1e-6


def test_degenerate_residual_falls_back_to_p():
    p = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.4, 0.6]])
    assert torch.allclose(spec._residual(p, p), p)
    assert torch.allclose(spec._residual(p, p + 1e-8), p)
    assert torch.allclose(spec._residual(p, torch.zeros_like(p)), p)
    assert torch.allclose(spec._residual(p, torch.tensor([[1.0, 0.0, 0.0]] * 2)), torch.tensor([[0, 0.375, 0.625],
                                                                                               [0, 0.4, 0.6]]))
    # an over-weighted q (p - q <= 0 everywhere) rejects now and then and must still emit p's tokens
    target = PAIRS[0][0]
    out = draft_and_verify(target, 2 * target, 20_000, 1, seed=5)
    assert (out.accepted == 0).any()
    assert chi_square_p_value(out.tokens[:, 0], target) > 0.01


# --------------------------------------------------------------------------- greedy
def test_greedy_keeps_drafts_while_they_match_the_argmax():
    v = 6
    best = torch.tensor([[4, 1, 5, 2], [4, 1, 5, 2], [0, 3, 3, 3]])
    logits = torch.nn.functional.one_hot(best, v).float() * 5 + torch.rand(3, 4, v)
    drafts = torch.tensor([[4, 1, 5], [4, 2, 5], [1, 3, 3]])
    out = verify_greedy(logits, drafts)
    assert out.accepted.tolist() == [3, 1, 0]
    assert out.rows() == [[4, 1, 5, 2], [4, 1], [0]]
    out = verify_greedy(logits, drafts, lengths=torch.tensor([2, 3, 3]))
    assert out.rows() == [[4, 1, 5], [4, 1], [0]]


# --------------------------------------------------------------------------- prompt lookup
def test_prompt_lookup_prefers_the_longest_ngram():
    #           0  1  2  3  4  5  6  7  8  9
    history = [5, 6, 7, 1, 9, 7, 8, 2, 6, 7]
    # "6 7" occurred at 1..2 (followed by 1 9); "7" alone last occurred at 5 (followed by 8 2)
    assert prompt_lookup(history, max_ngram=2, k=2) == [1, 9]
    assert prompt_lookup(history, max_ngram=1, k=2) == [8, 2]
    assert prompt_lookup(history, max_ngram=3, k=2, min_ngram=2) == [1, 9]
    assert prompt_lookup(history, max_ngram=3, k=2, min_ngram=3) == []


def test_prompt_lookup_takes_the_most_recent_occurrence_and_truncates():
    history = [1, 2, 3, 1, 2, 4, 5, 1, 2]
    assert prompt_lookup(history, max_ngram=2, k=3) == [4, 5, 1]
    assert prompt_lookup(history, max_ngram=2, k=1) == [4]
    assert prompt_lookup(history, max_ngram=2, k=0) == []
    assert prompt_lookup([1, 2, 3, 1, 2], max_ngram=2, k=5) == [3, 1, 2]  # cut at the history's end
    assert prompt_lookup(torch.tensor([7, 7, 7]), max_ngram=3, k=4) == [7]  # overlapping occurrence


def test_prompt_lookup_without_a_match_is_empty():
    assert prompt_lookup([1, 2, 3, 4], max_ngram=3, k=4) == []
    assert prompt_lookup([], max_ngram=3, k=4) == []
    assert prompt_lookup([3], max_ngram=3, k=4) == []
    assert prompt_lookup_batch(torch.tensor([[1, 2, 1], [1, 2, 3]]), 2, 2) == [[2, 1], []]


def test_prompt_lookup_bad_arguments():
    with pytest.raises(LmlabError, match="min_ngram"):
        prompt_lookup([1, 2], max_ngram=1, k=2, min_ngram=2)
    with pytest.raises(LmlabError, match="k must be"):
        PromptLookup(max_ngram=2, k=-1)
    with pytest.raises(LmlabError, match="1-D"):
        prompt_lookup(torch.zeros(2, 2, dtype=torch.long), 2, 2)


def test_prompt_lookup_index_agrees_with_the_scan():
    rng = random.Random(0)
    for trial in range(40):
        history = [rng.randrange(4 if trial % 2 else 12) for _ in range(rng.randrange(1, 60))]
        index = PromptLookup(max_ngram=3, k=4, min_ngram=1 + trial % 2, tokens=history[:5])
        for end in range(5, len(history) + 1):
            if end > 5:
                index.extend([history[end - 1]])
            assert index.draft() == prompt_lookup(history[:end], 3, 4, 1 + trial % 2), (history[:end], trial)


# --------------------------------------------------------------------------- draft length
def test_speedup_matches_the_closed_form_and_alpha_one():
    for alpha, c, k in [(0.8, 0.1, 4), (0.3, 0.05, 2), (0.95, 0.5, 7)]:
        closed = (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))
        assert speedup(alpha, c, k) == pytest.approx(closed)
    assert speedup(1.0, 0.25, 4) == pytest.approx(5 / 2)
    assert speedup(0.0, 0.1, 3) == pytest.approx(1 / 1.3)


def test_best_k_is_the_analytical_argmax():
    for alpha, c in [(0.8, 0.05), (0.6, 0.2), (0.9, 0.02), (0.5, 0.3)]:
        values = {k: (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1)) for k in range(1, 9)}
        k, s = best_k(alpha, c, 8)
        assert k == max(values, key=values.get) and s == pytest.approx(values[k])
    assert best_k(0.8, 0.05, 8)[0] > best_k(0.6, 0.2, 8)[0]


def feed(ctl: DraftController, alpha: float, passes: int, rng: random.Random, draft_s=0.0, target_s=1.0):
    """Speculative passes where each draft survives with probability alpha (and the plain steps the controller
    asks for now and then to re-time a plain step, each taking target_s)."""
    for _ in range(passes):
        k = ctl.k
        if k == 0 and ctl.on:
            ctl.record_plain(target_s=target_s)
            k = ctl.k
        assert k > 0
        n = 0
        while n < k and rng.random() < alpha:
            n += 1
        ctl.record(k, n, draft_s=draft_s * k, target_s=target_s)


def test_controller_estimates_alpha_from_decided_drafts():
    ctl = DraftController(4, cost_ratio=0.0, decay=0.999, warmup=10_000)
    feed(ctl, 0.7, 3000, random.Random(1))
    assert ctl.alpha == pytest.approx(0.7, abs=0.02)  # accepted / proposed would say about 0.52


def test_controller_picks_the_best_k_for_the_measured_alpha_and_c():
    ctl = DraftController(8, decay=0.99)
    feed(ctl, 0.8, 400, random.Random(2), draft_s=0.05, target_s=1.0)
    assert ctl.c == pytest.approx(0.05)
    k = ctl.best()[0]  # (ctl.k itself is 0 on the passes that re-time a plain step)
    assert ctl.on and k == best_k(ctl.alpha, 0.05, 8)[0]
    assert k == best_k(0.8, 0.05, 8)[0] or abs(k - best_k(0.8, 0.05, 8)[0]) == 1


def test_controller_switches_off_when_drafting_costs_too_much():
    ctl = DraftController(4, warmup=4)
    feed(ctl, 0.5, 4, random.Random(3), draft_s=1.5, target_s=1.0)
    assert ctl.k == 0 and not ctl.on
    assert ctl.off_reason == ctl.reason
    assert "expected speed-up" in ctl.reason and "< 1 at" in ctl.reason and "c=1.50" in ctl.reason
    assert ctl.events[-1][1] == "off"


def test_controller_switches_off_when_drafts_are_rejected():
    ctl = DraftController(4, warmup=6)
    for _ in range(5):
        ctl.record([4, 4], [0, 0], draft_s=1.2, target_s=1.0)  # c = 0.3
        assert ctl.on  # still warming up
    ctl.record([4, 4], [0, 0], draft_s=1.2, target_s=1.0)
    assert speedup(0.2, 0.3, 1) < 1 < speedup(0.2, 0.1, 1)  # with cheaper drafts alpha 0.2 would pay
    assert ctl.k == 0 and "acceptance 0.1" in ctl.reason


def test_controller_reprobes_and_turns_back_on():
    ctl = DraftController(4, warmup=2, probe_every=8, probe_passes=2)
    rng = random.Random(4)
    feed(ctl, 0.0, 2, rng, draft_s=0.5)
    assert ctl.k == 0
    for step in range(8):
        assert ctl.k == 0, step
        ctl.record_plain(target_s=1.0)
    assert ctl.k == 2  # probing, with short drafts
    feed(ctl, 1.0, 2, rng, draft_s=0.5)
    assert ctl.on and ctl.k > 0 and ctl.events[-1][1] == "on" and ctl.off_reason is None


def test_failed_probes_back_off():
    ctl = DraftController(4, warmup=1, probe_every=4, probe_max=16, probe_passes=1)
    ctl.record(4, 0, draft_s=2.0, target_s=1.0)  # c = 0.5
    assert not ctl.on
    waits = []
    for _ in range(4):
        plain = 0
        while ctl.k == 0:
            ctl.record_plain(target_s=1.0)
            plain += 1
        waits.append(plain)
        ctl.record(ctl.k, 0, draft_s=0.5 * ctl.k, target_s=1.0)
    assert waits == [4, 8, 16, 16]
    assert not ctl.on and "< 1.05 needed to resume after a re-probe" in ctl.reason


def test_controller_counts_no_match_as_a_plain_step():
    ctl = DraftController(4, warmup=1)
    ctl.record([0, 0], [0, 0])
    assert ctl.on and ctl.passes == 0


def test_controller_measures_the_verify_cost():
    ctl = DraftController(4, decay=0.5, warmup=1)
    ctl.record_plain(target_s=1.0)
    ctl.record(4, 4, draft_s=0.0, target_s=1.8)  # a 5-token pass costs 1.8 plain steps
    assert ctl.v == pytest.approx(0.2)


def test_controller_retimes_a_plain_step_every_so_often():
    ctl = DraftController(4, warmup=1, refresh_every=5)
    ctl.record_plain(target_s=1.0)
    ks = []
    for _ in range(12):
        ks.append(ctl.k)
        if ks[-1]:
            ctl.record(ks[-1], ks[-1], draft_s=0.0, target_s=1.0)
        else:
            ctl.record_plain(target_s=2.0)  # the machine slowed down: plain steps now take 2
    assert [k > 0 for k in ks] == [True] * 5 + [False] + [True] * 5 + [False]
    assert ctl.on and ctl.v == 0.0  # verification passes (1.0) measured against the latest plain steps
    assert DraftController(4, refresh_every=None).k > 0


def test_controller_counts_the_rest_of_a_pass():
    """Drafts cheap and often accepted, but each pass spends a plain step outside drafting and verification
    (o): S(k) < 1 for every k, so speculation goes off, where without o it would stay on."""
    alpha, c = 0.6, 0.1
    assert best_k(alpha, c, 4)[1] > 1.2 and best_k(alpha, c, 4, o=1.0)[1] < 1
    ctl = DraftController(4, warmup=3, decay=0.5)
    ctl.record_plain(target_s=1.0)
    rng = random.Random(5)
    for _ in range(3):
        k = ctl.k
        n = sum(1 for _ in iter(lambda: rng.random() < alpha, False))
        ctl.record(k, min(n, k), draft_s=c * k, target_s=1.0, pass_s=c * k + 1.0 + 1.0)
    assert ctl.o == pytest.approx(1.0) and not ctl.on and "o=1.00" in ctl.reason


def test_controller_starts_with_a_short_pass():
    ctl = DraftController(8, warmup=1)
    assert ctl.k == ctl.probe_k == 2  # the first pass measures what a pass costs before k grows
    ctl.record_plain(target_s=1.0)
    ctl.record(2, 2, draft_s=0.0, target_s=1.0)
    assert ctl.k == 8


def test_batch_rows_keep_their_own_acceptance():
    """Row 0 copies its drafts, row 1 never does: while both draft, S(k) averages their expected tokens; once
    row 0 has finished, the pass serves row 1 alone and speculation goes off (a pass costs the same with one
    live row, and the pooled α still says 0.5)."""
    ctl = DraftController(4, warmup=1, decay=0.8)
    ctl.record_plain(target_s=1.0)
    for _ in range(12):
        ctl.rows = [0, 1]
        k = ctl.k or 4
        ctl.record([k, k], [k, 0], draft_s=0.05 * k, target_s=1.2, rows=[0, 1])
    assert ctl.on and ctl.row_alpha(0) > 0.9 and ctl.row_alpha(1) < 0.1 and 0.4 < ctl.alpha < 0.95
    ctl.rows = [1]
    assert ctl.best()[1] < 1 < speedup(ctl.alpha, ctl.c, 1, ctl.v)
    ctl.record([2], [0], draft_s=0.1, target_s=1.2, rows=[1])
    assert not ctl.on


def test_one_slow_first_plain_step_does_not_stay_the_baseline():
    ctl = DraftController(4)
    ctl.record_plain(target_s=2.0)  # the first step after a prompt, slow
    for _ in range(3):
        ctl.record_plain(target_s=1.0)
    assert ctl._plain_s.value < 1.2


def test_controller_bad_arguments():
    with pytest.raises(LmlabError, match="k_max"):
        DraftController(0)
    with pytest.raises(LmlabError, match="decay"):
        DraftController(4, decay=1.0)


# --------------------------------------------------------------------------- stats
def test_stats_counts_and_report():
    st = SpecStats(method="prompt lookup")
    st.record([4, 4], [0, 4], draft_s=0.002, target_s=0.1)
    st.record([4], [2], draft_s=0.002, target_s=0.1)
    st.record_plain(rows=2, target_s=0.08)
    st.total_s = 0.5
    assert st.proposed == 12 and st.accepted == 6 and st.passes == 2 and st.row_passes == 3
    assert st.acceptance_rate == pytest.approx(0.5)
    assert st.tokens_per_pass == pytest.approx(3.0)
    assert st.emitted == 11
    assert st.histogram_line() == "0:1 1:0 2:1 3:0 4:1"
    assert st.cost_ratio == pytest.approx((0.004 / 8) / 0.08)
    st.switched_off = "expected speed-up 0.80 < 1"
    text = st.format(plain_tokens_per_s=11.0)
    assert "acceptance rate   0.500 (6/12" in text
    assert "0:1 1:0 2:1 3:0 4:1" in text
    assert "draft 0.50 ms/step, target 100.00 ms/pass" in text
    assert "22.0 tok/s" in text and "x2.00 over plain" in text
    assert text.splitlines()[-1] == "  speculation switched off: expected speed-up 0.80 < 1"
    assert "switched off" not in SpecStats().format()
