"""MoE block: naive per-token reference, hand-computed auxiliary losses, gradients, HF equivalence."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.model.moe import MoE, MoEConfig, load_balance_report, moe_state_from_hf, moe_state_to_hf

ACT = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}


def make(seed=0, dtype=torch.float64, std=0.5, **kw):
    cfg = dict(n_experts=4, top_k=2, d_model=6, d_ff=5)
    cfg.update(kw)
    torch.manual_seed(seed)
    moe = MoE(MoEConfig(**cfg)).to(dtype)
    moe.reset_parameters(std)
    return moe


def expert(t, w_in, w_out, activation):
    h = w_in @ t
    if activation == "swiglu":
        gate, up = h[: h.shape[0] // 2], h[h.shape[0] // 2:]
        h = F.silu(gate) * up
    else:
        h = ACT[activation](h)
    return w_out @ h


def naive(moe, x, valid=None):
    """Token by token: softmax over experts, top-k, optional renormalisation, weighted experts + shared."""
    cfg = moe.cfg
    xs = x.reshape(-1, cfg.d_model)
    real = [True] * xs.shape[0] if valid is None else valid.reshape(-1).tolist()
    rows = []
    for t, is_real in zip(xs, real):
        y = torch.zeros_like(t)
        if is_real:
            p = torch.softmax(moe.router.weight @ t, dim=0)
            w, idx = torch.topk(p, cfg.top_k)
            if cfg.renormalize:
                w = w / w.sum()
            for wj, e in zip(w, idx):
                y = y + wj * expert(t, moe.w_in[e], moe.w_out[e], cfg.activation)
        if moe.shared is not None:
            s = expert(t, moe.shared.w_in.weight, moe.shared.w_out.weight, cfg.activation)
            y = y + torch.sigmoid(moe.shared_gate.weight @ t) * s
        rows.append(y)
    return torch.stack(rows).view(x.shape)


# --------------------------------------------------------------------------- config
def test_top_k_larger_than_experts_names_both():
    with pytest.raises(LmlabError, match="top_k 5 .*n_experts 4"):
        MoEConfig(n_experts=4, top_k=5, d_model=8, d_ff=8)


@pytest.mark.parametrize("field,value", [("n_experts", 0), ("top_k", 0), ("d_model", -1), ("d_ff", 0),
                                         ("shared_expert_d_ff", -2), ("d_ff", 2.5), ("top_k", True)])
def test_bad_sizes_are_errors(field, value):
    kw = dict(n_experts=4, top_k=2, d_model=8, d_ff=8)
    kw[field] = value
    with pytest.raises(LmlabError, match=field):
        MoEConfig(**kw)


@pytest.mark.parametrize("field,value", [("activation", "swish"), ("aux_loss_coef", -0.1),
                                         ("z_loss_coef", float("nan"))])
def test_bad_options_are_errors(field, value):
    kw = dict(n_experts=4, top_k=2, d_model=8, d_ff=8)
    kw[field] = value
    with pytest.raises(LmlabError, match=field if field != "activation" else "swish"):
        MoEConfig(**kw)


def test_bad_inputs_are_errors():
    moe = make()
    with pytest.raises(LmlabError, match="d_model 6"):
        moe(torch.randn(2, 3, 5, dtype=torch.float64))
    with pytest.raises(LmlabError, match="valid mask"):
        moe(torch.randn(2, 3, 6, dtype=torch.float64), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(LmlabError, match="valid mask"):
        moe(torch.randn(2, 3, 6, dtype=torch.float64), torch.ones(2, 3))


# --------------------------------------------------------------------------- output vs the naive loop
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shared", [0, 3])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_matches_naive_loop(top_k, renormalize, shared, activation):
    moe = make(top_k=top_k, renormalize=renormalize, shared_expert_d_ff=shared, activation=activation)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    out = moe(x)
    torch.testing.assert_close(out.y, naive(moe, x), rtol=1e-12, atol=1e-12)
    assert out.router_logits.shape == (3, 7, 4)
    assert int(out.counts.sum()) == 3 * 7 * top_k


@pytest.mark.parametrize("shared", [0, 3])
def test_padding_is_not_routed(shared):
    moe = make(shared_expert_d_ff=shared)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    out = moe(x, valid)
    torch.testing.assert_close(out.y, naive(moe, x, valid), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.y[valid], moe(x).y[valid], rtol=1e-12, atol=1e-12)
    assert int(out.counts.sum()) == 7 * 2


def test_gradients_match_naive_loop():
    moe = make(top_k=2, renormalize=True, shared_expert_d_ff=3)
    x = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 6, 6, dtype=torch.float64)
    grads = []
    for fn in (lambda: moe(x).y, lambda: naive(moe, x)):
        moe.zero_grad()
        x.grad = None
        (fn() * r).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in grads[0])   # router, experts, shared expert and its gate all learn


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradcheck(renormalize):
    moe = make(n_experts=3, top_k=2, d_model=3, d_ff=2, renormalize=renormalize, shared_expert_d_ff=2, seed=1)
    names = [n for n, _ in moe.named_parameters()]
    x = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True, False, True]])

    def f(x, *params):
        out = torch.func.functional_call(moe, dict(zip(names, params)), (x, valid))
        return out.y, out.balance_loss, out.z_loss

    params = tuple(p.detach().clone().requires_grad_() for p in moe.parameters())
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- auxiliary losses
def fixed_router(probs, shift):
    """An MoE whose router logits equal the input: logits = log(probs) + shift, so softmax = probs and
    logsumexp = shift exactly."""
    moe = make(n_experts=4, top_k=2, d_model=4, d_ff=3, aux_loss_coef=0.5, z_loss_coef=0.25)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, dtype=torch.float64))
    x = torch.log(torch.tensor(probs, dtype=torch.float64)) + torch.tensor(shift, dtype=torch.float64)[..., None]
    return moe, x


# rows: B=2, T=2; the last position is padding
PROBS = [[[0.5, 0.25, 0.125, 0.125], [0.4, 0.3, 0.2, 0.1]],
         [[0.1, 0.2, 0.3, 0.4], [0.05, 0.02, 0.03, 0.9]]]
SHIFT = [[1.0, 2.0], [-1.0, 10.0]]
VALID = torch.tensor([[True, True], [True, False]])


def test_balance_and_z_loss_hand_computed_without_padding():
    moe, x = fixed_router(PROBS, SHIFT)
    out = moe(x, VALID)
    # real tokens' top-2: {0,1}, {0,1}, {3,2}  ->  counts 2,2,1,1;  f = counts / 3 tokens
    # P = mean of the three real prob rows = [1.0, 0.75, 0.625, 0.625] / 3
    # E * sum f P = 4 * (2*1.0 + 2*0.75 + 1*0.625 + 1*0.625) / 9 = 19/9
    assert out.counts.tolist() == [2, 2, 1, 1]
    assert out.balance_loss.item() == pytest.approx(19 / 9, abs=1e-12)
    # logsumexp of each real row is its shift: (1^2 + 2^2 + (-1)^2) / 3 = 2
    assert out.z_loss.item() == pytest.approx(2.0, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.5 * 19 / 9 + 0.25 * 2.0, abs=1e-12)


def test_padding_would_change_the_losses():
    moe, x = fixed_router(PROBS, SHIFT)
    out = moe(x)   # all four positions counted: the padding row routes to {3, 0}
    assert out.counts.tolist() == [3, 2, 1, 2]
    # f = [3,2,1,2]/4, P = [1.05, 0.77, 0.655, 1.525]/4  ->  4 * (3.15+1.54+0.655+3.05)/16 = 8.395/4
    assert out.balance_loss.item() == pytest.approx(8.395 / 4, abs=1e-12)
    assert out.z_loss.item() == pytest.approx((1 + 4 + 1 + 100) / 4, abs=1e-12)


def test_balance_loss_equals_transformers_function():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    moe = make(n_experts=5, top_k=2, d_model=6, dtype=torch.float32)
    x = torch.randn(3, 8, 6)
    valid = torch.rand(3, 8) > 0.3
    out = moe(x, valid)
    ref = load_balancing_loss_func((out.router_logits.reshape(-1, 5),), 5, 2, valid.long())
    assert out.balance_loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_softmax_applied_once():
    """All experts identical and no renormalisation: y = (p1 + p2) * expert(x) with p = softmax(logits).
    A second softmax over the probabilities would give 0.564 instead of 0.75 here."""
    moe, x = fixed_router([[0.5, 0.25, 0.125, 0.125]], [0.0])
    moe.cfg.renormalize = False
    with torch.no_grad():
        moe.w_in.copy_(moe.w_in[0].expand_as(moe.w_in))
        moe.w_out.copy_(moe.w_out[0].expand_as(moe.w_out))
    out = moe(x)
    torch.testing.assert_close(out.y[0], 0.75 * expert(x[0], moe.w_in[0], moe.w_out[0], "swiglu"))


def test_aux_loss_always_returned_and_trains_the_router():
    moe = make(z_loss_coef=1e-3).eval()   # eval mode too: the terms are never skipped
    out = moe(torch.randn(2, 4, 6, dtype=torch.float64))
    assert out.loss.requires_grad and out.loss.item() > 0
    out.loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_no_real_tokens_gives_zero_losses():
    moe = make()
    out = moe(torch.randn(1, 3, 6, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.bool))
    assert out.counts.tolist() == [0, 0, 0, 0]
    assert out.balance_loss.item() == 0 and out.z_loss.item() == 0
    assert torch.all(out.y == 0)


def test_active_params():
    moe = make(n_experts=8, top_k=2, d_model=6, d_ff=5, shared_expert_d_ff=4)
    per_expert = 2 * 5 * 6 + 6 * 5
    router, shared = 8 * 6, 2 * 4 * 6 + 6 * 4 + 6
    assert moe.num_params() == router + 8 * per_expert + shared
    assert moe.num_active_params() == router + 2 * per_expert + shared


# --------------------------------------------------------------------------- load report
def test_load_balance_report():
    r = load_balance_report(torch.tensor([6, 2, 0, 4]))
    assert r.fractions == pytest.approx([0.5, 1 / 6, 0.0, 1 / 3])
    assert r.total == 12 and r.idle == 1
    assert r.max_over_mean == pytest.approx(2.0)
    assert r.cv == pytest.approx(math.sqrt(((6 - 3) ** 2 + 1 + 9 + 1) / 4) / 3)
    assert "max/mean 2.00" in r.line and "idle 1" in r.line and "#0 50.0%" in r.line
    assert "no tokens" in load_balance_report([0, 0]).line
    for bad in ([], [1, -1], [[1, 2]]):
        with pytest.raises(LmlabError, match="counts"):
            load_balance_report(bad)


# --------------------------------------------------------------------------- HF transformers equivalence
def hf_layer(tmp_path, family, **kw):
    """A 1-layer HF model with large random weights, saved and read back as on-disk tensors."""
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=2, experts_implementation="eager")
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=6, num_local_experts=4, **common))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=12, moe_intermediate_size=6, num_experts=4,
                                                   shared_expert_intermediate_size=10, **common, **kw))
    block = model.model.layers[0].mlp
    torch.manual_seed(3)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.5)
    model.save_pretrained(tmp_path)
    prefix = "model.layers.0."
    tensors = {k[len(prefix):]: v for k, v in load_file(tmp_path / "model.safetensors").items()
               if k.startswith(prefix)}
    return block.eval(), tensors


@pytest.mark.parametrize("family,kw,ours", [
    ("mixtral", {}, dict(renormalize=True)),
    ("qwen2_moe", {}, dict(renormalize=False, shared_expert_d_ff=10)),
    ("qwen2_moe", dict(norm_topk_prob=True), dict(renormalize=True, shared_expert_d_ff=10)),
])
def test_matches_transformers(tmp_path, family, kw, ours):
    block, tensors = hf_layer(tmp_path, family, **kw)
    moe = MoE(MoEConfig(n_experts=4, top_k=2, d_model=8, d_ff=6, **ours))
    moe.load_state_dict(moe_state_from_hf(family, tensors, 4), strict=True)
    # the on-disk names map onto transformers' own fused in-memory layout
    torch.testing.assert_close(moe.w_in, block.experts.gate_up_proj, rtol=0, atol=0)
    torch.testing.assert_close(moe.w_out, block.experts.down_proj, rtol=0, atol=0)
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        want, out = block(x), moe(x)
        hf_logits = block.gate(x.reshape(-1, 8))[0]
    assert (want - out.y).abs().max().item() <= 1e-5
    assert (hf_logits - out.router_logits.reshape(-1, 4)).abs().max().item() <= 1e-6
    back = moe_state_to_hf(family, moe.state_dict())
    block_keys = {k for k in tensors if not k.startswith(("self_attn.", "input_layernorm", "post_attention"))}
    assert back.keys() == block_keys
    assert all(torch.equal(back[k], tensors[k]) for k in block_keys)


def test_hf_map_errors():
    with pytest.raises(LmlabError, match="'llama'"):
        moe_state_from_hf("llama", {}, 2)
    with pytest.raises(LmlabError, match="missing"):
        moe_state_from_hf("mixtral", {"block_sparse_moe.gate.weight": torch.zeros(2, 4)}, 2)
    with pytest.raises(LmlabError, match="no shared expert"):
        moe_state_to_hf("mixtral", make(shared_expert_d_ff=3).state_dict())


# --------------------------------------------------------------------------- global-batch balance (2 processes)
GLOBAL_SCRIPT = r'''
import json, sys, torch, torch.distributed as dist
from lmlab.model.moe import MoE, MoEConfig
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
moe = MoE(MoEConfig(n_experts=4, top_k=2, d_model=6, d_ff=5, global_balance=True)).double()
moe.reset_parameters(0.5)
torch.manual_seed(1 + rank)
x = torch.randn(2, 5 + 3 * rank, 6, dtype=torch.float64)
valid = torch.rand(2, 5 + 3 * rank) > 0.25
out = moe.train()(x, valid)
counts, n = out.counts.double(), float(valid.sum())
both = torch.cat([counts, torch.tensor([n], dtype=torch.float64)])
dist.all_reduce(both)
P = torch.softmax(out.router_logits[valid], -1).mean(0)
expect_global = 4 * float((both[:4] / both[4] * P).sum())
expect_local = 4 * float((counts / n * P).sum())
got_eval = float(moe.eval()(x, valid).balance_loss)   # eval: no collective, local figure
moe.cfg.global_balance = False
got_local = float(moe.train()(x, valid).balance_loss)
json.dump({"global": [float(out.balance_loss), expect_global], "local": [got_local, expect_local],
           "eval": got_eval}, open(sys.argv[1] + f"/r{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_global_balance_all_reduces_counts(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "run.py").write_text(GLOBAL_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])   # this checkout's lmlab, not an installed one
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--nproc-per-node", "2", "--master-port",
           str(port), str(tmp_path / "run.py"), str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=root, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root})
    for rank in (0, 1):
        r = json.loads((tmp_path / f"r{rank}.json").read_text())
        assert r["global"][0] == pytest.approx(r["global"][1], abs=1e-12)
        assert r["local"][0] == pytest.approx(r["local"][1], abs=1e-12)
        assert r["eval"] == pytest.approx(r["local"][1], abs=1e-12)
        assert abs(r["global"][0] - r["local"][0]) > 1e-6   # the two ranks' loads really differ
