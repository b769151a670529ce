"""The trainer with a mixture-of-experts model: the auxiliary loss trains the router, tokens per expert and
a balance figure are logged, MFU counts active parameters, the expert-load histogram is drawn."""
from __future__ import annotations

import json

import pytest
import torch

from lmlab.config import preset
from lmlab.data import PrepareConfig, prepare
from lmlab.model import Transformer
from lmlab.train.config import load_config
from lmlab.train.metrics import ExpertLoad
from lmlab.train.trainer import flops_per_token

MOE = ["model.preset=baby-gpt", "model.n_layer=2", "model.n_head=2", "model.d_model=32", "model.moe_experts=4",
       "model.moe_top_k=2", "model.moe_layers=[1]", "model.moe_z_coef=0.001", "seq_len=16", "batch_size=3",
       "eval_iters=1", "log_interval=2", "threads=1", "progress=false", "tensorboard=false",
       "save_model=false", "max_iters=4", "eval_interval=4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "corpus.txt").write_text("".join(f"line {i}: the fox number {i * 7 % 13} jumps.\n" for i in range(400)))
    prepare(PrepareConfig(inputs=[str(folder / "corpus.txt")], out_dir=str(folder / "prepared"), workers=1,
                          progress=False))
    return folder / "prepared"


def test_moe_pretraining_logs_expert_load_and_counts_active_params(tmp_path, data_dir):
    from lmlab.train import train

    summary = train(load_config(None, [*MOE, f"data.path={data_dir}", f"out_dir={tmp_path}"]))
    d, f = 32, 128  # baby-gpt's gelu experts: w_in f×d and w_out d×f each
    assert summary["params"] - summary["active_params"] == (4 - 2) * 2 * d * f
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 2
    for r in train_rows:  # every token of 2 iterations × 3 rows × 16 positions, routed to 2 experts
        assert sum(r["moe_tokens"]) == 2 * 3 * 16 * 2 and list(r["moe_tokens_per_layer"]) == ["decoder.1"]
        assert r["moe_max_over_mean"] >= 1.0 and r["moe_aux_loss"] > 0 and r["moe_balance_loss"] >= 2.0 - 1e-4
    assert sum(summary["moe_tokens_per_layer"]["decoder.1"]) == 4 * 3 * 16 * 2
    assert summary["moe_load"].startswith("moe load: 4 experts")
    assert (tmp_path / "expert_load.png").is_file()


def test_aux_loss_reaches_the_router_and_mfu_uses_active_params():
    model = Transformer(preset("tiny-llama", n_layer=1, moe_experts=4, moe_top_k=1, moe_aux_coef=1.0)).train()
    ids = torch.randint(0, 512, (2, 12))
    with model.moe_stats() as stats:
        loss = model(ids, labels=ids)
    router = model.decoder.blocks[0].mlp.router.weight
    (g_lm,) = torch.autograd.grad(loss, router, retain_graph=True)
    (g_aux,) = torch.autograd.grad(stats.loss, router)
    assert g_aux.abs().sum() > 0 and not torch.allclose(g_lm, g_lm + g_aux)
    n, active = model.num_params(), model.num_active_params()
    assert n - active == 3 * 3 * 64 * 128  # three unused swiglu experts of 3·d·f
    assert flops_per_token(model.cfg, active, 12) < flops_per_token(model.cfg, n, 12)


def test_moe_stats_sum_over_calls_and_close():
    model = Transformer(preset("tiny-llama", n_layer=2, moe_experts=3, moe_top_k=2)).eval()
    ids = torch.randint(0, 512, (1, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    with model.moe_stats() as stats:
        model(ids, attention_mask=mask)
        model(ids)
    assert {k: int(v.sum()) for k, v in stats.counts.items()} == {"decoder.0": (4 + 5) * 2, "decoder.1": (4 + 5) * 2}
    with torch.no_grad():
        model(ids)  # outside the block nothing is collected
    assert int(stats.total_counts().sum()) == 2 * 18
    load = ExpertLoad()
    load.add(stats, 0.5)
    row = load.row()
    assert sum(row["moe_tokens"]) == 36 and row["moe_aux_loss"] == 0.5 and load.row() == {}


@pytest.mark.parametrize("recipe,extra", [("bert-mlm-nsp.yaml", ["model.attn_window=8", "model.attn_global_tokens=1"]),
                                          ("t5-span.yaml", [])])
def test_other_objectives_train_with_moe(tmp_path, recipe, extra):
    """MLM+NSP (an encoder, here also with local+global attention) and T5 span corruption (both stacks)."""
    from pathlib import Path

    from lmlab.train import train

    text = "".join(f"Speaker {i % 5}:\nline {i} of the play, with words.\n\n" for i in range(300))
    (tmp_path / "play.txt").write_text(text)
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / recipe, [
        f"data.corpus={tmp_path / 'play.txt'}", "data.doc_boundary=blank_line", "data.workers=1",
        f"out_dir={tmp_path / 'out'}", "max_iters=2", "eval_interval=2", "eval_iters=1", "batch_size=2",
        "log_interval=1", "model.n_layer=1", "model.moe_experts=4", "model.moe_top_k=2", "threads=1", "plot=false",
        "progress=false", "save_model=false", *extra])
    summary = train(cfg)
    assert summary["val_loss"] is not None and summary["active_params"] < summary["params"]
    assert sum(sum(c) for c in summary["moe_tokens_per_layer"].values()) > 0


def test_window_longer_than_the_training_context_is_a_one_line_error(tmp_path, data_dir):
    from lmlab.errors import LmlabError
    from lmlab.train import train

    cfg = load_config(None, [*MOE, "model.attn_window=32", f"data.path={data_dir}", f"out_dir={tmp_path}"])
    with pytest.raises(LmlabError, match=r"attn_window: 32 is larger than the context max_seq_len=16$"):
        train(cfg)
