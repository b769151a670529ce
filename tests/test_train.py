"""The trainer: schedule, parameter groups, configs, exact resume after SIGKILL, torchrun equivalence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.data import PrepareConfig, prepare
from lmlab.errors import LmlabError
from lmlab.train.config import TrainConfig, load_config
from lmlab.train.trainer import lr_at, param_groups

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
TINY = ["model.preset=baby-gpt", "model.n_layer=1", "model.n_head=2", "model.d_model=32", "seq_len=16",
        "eval_iters=1", "log_interval=5", "threads=1", "plot=false", "progress=false", "tensorboard=false"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    text = "".join(f"line {i}: the {'quick' if i % 3 else 'lazy'} fox number {i * 7 % 13} jumps.\n" for i in range(800))
    (folder / "corpus.txt").write_text(text)
    prepare(PrepareConfig(inputs=[str(folder / "corpus.txt")], out_dir=str(folder / "prepared"), workers=1,
                          progress=False))
    return folder / "prepared"


def run_cli(args: list[str], nproc: int = 0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(29500 + os.getpid() % 1000), "-m", "lmlab", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "lmlab", "pretrain", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return err


def params(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "ckpt.pt", weights_only=True)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_lr_schedule_warmup_cosine():
    cfg = TrainConfig(max_iters=1000)
    cfg.optim.warmup_iters, cfg.optim.lr, cfg.optim.min_lr = 100, 1e-3, 1e-4
    lrs = [lr_at(i, cfg) for i in range(1200)]
    assert lrs[0] < lrs[50] < lrs[99] < 1e-3 and abs(max(lrs) - 1e-3) < 1e-5
    assert all(a >= b for a, b in zip(lrs[100:1000], lrs[101:1001]))  # monotone decay after warmup
    assert abs(lrs[1000] - 1e-4) < 1e-9 and lrs[1100] == 1e-4
    assert abs(lr_at(550, cfg) - 5.5e-4) < 1e-9  # half-way through the cosine


def test_no_weight_decay_on_norms_biases_embeddings():
    from lmlab.config import preset
    from lmlab.model import Transformer

    model = Transformer(preset("bert-base", n_layer=1, d_model=32, n_head=2, vocab_size=50))
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("weight") and "norm" not in n and "emb" not in n for n in decayed)
    assert {"tok_emb.weight", "pos_emb.weight", "type_emb.weight"} <= {names[id(p)] for p in rest["params"]}
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_optimizer_is_fused_and_baby_recipe_matches_nanogpt():
    """AdamW's fused kernel on CPU (4x faster than the per-tensor loop); the baby-GPT recipe has nanoGPT's
    model and optimizer: no bias in LayerNorms or Linears, every 2-D parameter decayed, c_proj scaled init."""
    from lmlab.utils.dist import Dist
    from lmlab.train.trainer import build_model_config, optimizer_impl
    from lmlab.model import Transformer

    cfg = load_config(ROOT / "configs" / "baby-gpt-shakespeare-char.yaml")
    assert optimizer_impl("cpu", Dist(), cfg) == {"fused": True}
    model = Transformer(build_model_config(cfg, 65))
    assert all(getattr(m, "bias", None) is None for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))
    decay, rest = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_embeddings)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in rest["params"])
    assert cfg.scaled_residual_init and cfg.seq_len == 64 and cfg.batch_size == 12 and cfg.max_iters == 2000
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.beta2, cfg.optim.warmup_iters, cfg.optim.grad_clip) == \
        (1e-3, 1e-4, 0.99, 100, 1.0)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1e-3\n  warmup_iter: 5\n")
    with pytest.raises(LmlabError, match=r"unknown key 'warmup_iter' \(did you mean 'warmup_iters'\?\)"):
        load_config(bad)
    with pytest.raises(LmlabError, match=r"unknown key 'max_iter' \(did you mean 'max_iters'\?\)"):
        load_config(None, ["max_iter=3"])
    with pytest.raises(LmlabError, match="expected an integer"):
        load_config(None, ["batch_size=big"])
    with pytest.raises(LmlabError, match=r"unknown key 'mask_prb' for objective 'mlm' \(did you mean 'mask_prob'\?\)"):
        load_config(None, ["objectives=[{name: mlm, mask_prb: 0.2}]"])
    cfg = load_config(ROOT / "configs" / "baby-gpt-shakespeare-char.yaml", ["optim.lr=3e-4", "objectives.0.weight=2"])
    assert cfg.optim.lr == 3e-4 and cfg.objectives[0].weight == 2.0 and cfg.max_iters == 2000


def test_unknown_model_key_and_shape_change_on_resume(tmp_path, data_dir):
    from lmlab.train import train

    base = [*TINY, f"data.path={data_dir}", f"out_dir={tmp_path}", "max_iters=2", "eval_interval=2",
            "save_model=false"]
    with pytest.raises(LmlabError, match=r"unknown model config key 'n_layers' \(did you mean 'n_layer'\?\)"):
        train(load_config(None, [*base, "model.n_layers=2"]))
    train(load_config(None, base))
    with pytest.raises(LmlabError, match=r"cannot resume: checkpoint has model n_layer=1, config now gives n_layer=2"):
        train(load_config(None, [*base, "model.n_layer=2", "max_iters=4"]))


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, data_dir):
    """A run killed mid-way and resumed ends with the parameters of an uninterrupted run (dropout on, so
    the RNG state has to be restored too)."""
    args = [*TINY, f"data.path={data_dir}", "max_iters=80", "eval_interval=80", "checkpoint_interval=10",
            "model.dropout=0.1", "batch_size=4", "save_model=false", "deterministic=true"]
    finish(run_cli([*args, f"out_dir={tmp_path / 'whole'}"]))
    killed = tmp_path / "killed"
    p = run_cli([*args, f"out_dir={killed}"])
    ckpt_iter, deadline = 0, time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if (killed / "ckpt.pt").is_file():
            try:
                ckpt_iter = torch.load(killed / "ckpt.pt", weights_only=True)["iter"]
            except Exception:  # written in this instant
                ckpt_iter = 0
            if ckpt_iter >= 20:
                os.kill(p.pid, signal.SIGKILL)
                break
        time.sleep(0.02)
    p.wait()
    assert p.returncode == -signal.SIGKILL and 20 <= ckpt_iter < 80, "the run was not killed mid-way"
    err = finish(run_cli([*args, f"out_dir={killed}"]))
    assert "resuming from" in err
    final = torch.load(killed / "ckpt.pt", weights_only=True)
    assert final["iter"] == 80
    assert max_diff(final["model"], params(tmp_path / "whole")) <= 1e-6
    metrics = (killed / "metrics.jsonl").read_text().splitlines()
    iters = [int(line.split('"iter": ')[1].split(",")[0]) for line in metrics if '"split": "train"' in line]
    assert iters == sorted(set(iters)), "metrics repeat iterations after resume"


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_double_batch(tmp_path, data_dir):
    """2 processes (gloo) with batch b end where 1 process with batch 2b does, with DDP and with FSDP."""
    args = [*TINY, f"data.path={data_dir}", "max_iters=10", "eval_interval=10", "save_model=false",
            "optim.warmup_iters=2"]
    finish(run_cli([*args, "batch_size=8", f"out_dir={tmp_path / 'one'}"]))
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert one["iter"] == 10
    for mode in ("ddp", "fsdp"):
        err = finish(run_cli([*args, "batch_size=4", f"distributed={mode}", f"out_dir={tmp_path / mode}"], nproc=2))
        assert "2 process(es)" in err
        assert max_diff(one["model"], params(tmp_path / mode)) <= 1e-5, mode


@pytest.mark.slow
def test_demo_pretrain_lowers_validation_loss(tmp_path):
    from lmlab.checkpoints import load
    from lmlab.train import demo_pretrain

    summary = demo_pretrain(tmp_path, max_iters=60, eval_iters=4, progress=False)
    assert summary["val_loss"] < summary["val_loss_start"] - 0.8
    model, tok = load(summary["model_dir"])  # the native folder `lmlab generate -m` reads
    assert model.cfg.vocab_size == tok.vocab_size and (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                           if not p.name.startswith("finetune-")))  # tests/finetune runs those
def test_recipes_load_and_run(tmp_path, recipe):
    """Every recipe parses and trains for two iterations (tiny sizes; the real runs are in the README)."""
    from lmlab.train import train

    text = "".join(f"Speaker {i % 5}:\nline {i} of the play, with words.\n\n" for i in range(300))
    (tmp_path / "play.txt").write_text(text)
    cfg = load_config(ROOT / "configs" / recipe, [
        f"data.corpus={tmp_path / 'play.txt'}", "data.doc_boundary=blank_line", "data.workers=1",
        f"out_dir={tmp_path / 'out'}", "max_iters=2", "eval_interval=2", "eval_iters=1", "batch_size=2",
        "model.n_layer=1", "threads=1", "plot=false", "progress=false", "save_model=false"])
    summary = train(cfg)
    assert summary["val_loss"] is not None and summary["val_loss"] > 0


def test_t5_relative_bias_is_not_weight_decayed():
    """Only linear layers' matrices decay: T5's relative-position bias table is not one (nor a tied head)."""
    from lmlab.config import preset
    from lmlab.model import Transformer

    model = Transformer(preset("t5-small", n_layer=1, d_model=32, n_head=2, head_dim=16, d_ff=64, vocab_size=40))
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"encoder.rel_bias.weight", "decoder.rel_bias.weight", "tok_emb.weight"} <= \
        {names[id(p)] for p in rest["params"]}
    linears = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - {id(model.tok_emb.weight)}
    assert {id(p) for p in decay["params"]} == linears
    decay, _ = param_groups(model, 0.1, decay_embeddings=True)
    decayed = {names[id(p)] for p in decay["params"]}
    assert "tok_emb.weight" in decayed and not any("rel_bias" in n for n in decayed)


def test_model_section_is_typed_and_checked_with_the_config(tmp_path):
    cfg = load_config(None, ["model.n_layer=3", "model.norm=rmsnorm"])
    assert cfg.model.preset == "baby-gpt" and cfg.model.overrides == {"n_layer": 3, "norm": "rmsnorm"}
    assert cfg.to_dict()["model"] == {"preset": "baby-gpt", "n_layer": 3, "norm": "rmsnorm"}
    with pytest.raises(LmlabError, match=r"model.n_layer: expected an integer, got 'three'"):
        load_config(None, ["model.n_layer=three"])
    with pytest.raises(LmlabError, match=r"model.norm: 'rmsnrom' is not one of .*did you mean 'rmsnorm'"):
        load_config(None, ["model.norm=rmsnrom"])
    with pytest.raises(LmlabError, match=r"model \(preset baby-gpt\): d_model: 30 is not divisible by n_head=4"):
        load_config(None, ["model.d_model=30", "model.n_head=4"])
    with pytest.raises(LmlabError, match=r"unknown preset 'baby-gtp' \(did you mean 'baby-gpt'"):
        load_config(None, ["model.preset=baby-gtp"])
    with pytest.raises(LmlabError, match="max_seq_len=8 is shorter than seq_len=16"):
        load_config(None, ["model.max_seq_len=8", "seq_len=16"])
    with pytest.raises(LmlabError, match="init_from='nowhere/model' is not a file or folder"):
        load_config(None, ["model.init_from=nowhere/model"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_layer: 2\n")
    with pytest.raises(LmlabError, match="model needs exactly one of preset"):
        load_config(recipe)
    with pytest.raises(LmlabError, match=r"override 'seq_len.foo=3': seq_len is a value \(64\), not a section"):
        load_config(None, ["seq_len.foo=3"])
    with pytest.raises(LmlabError, match=r"optim.lr is a value"):
        load_config(None, ["optim.lr.x=1"])


def test_print_config_validates_and_bad_model_fails_before_data(tmp_path, capsys):
    from lmlab.cli import main
    from lmlab.train import train

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--print-config", "model.n_layers=2"])
    assert e.value.code == 1 and "did you mean 'n_layer'" in capsys.readouterr().err
    (tmp_path / "corpus.txt").write_text("some text to prepare\n" * 50)
    model = tmp_path / "start"
    from lmlab.checkpoints import native
    from lmlab.config import preset
    from lmlab.model import Transformer

    native.save(Transformer(preset("baby-gpt", n_layer=1, d_model=32, n_head=2, vocab_size=80)), None, model)
    cfg = load_config(None, [f"model.init_from={model}", "model.n_layer=2", f"data.corpus={tmp_path / 'corpus.txt'}",
                             "data.tokenizer=char", f"out_dir={tmp_path / 'out'}", "threads=1", "progress=false"])
    with pytest.raises(LmlabError, match=r"n_layer=2 over init_from=.* changes tensor 'decoder.blocks.1.attn.out.weight' "
                                         r"from None"):
        train(cfg)
    assert not (tmp_path / "out" / "data").exists()  # nothing was prepared


def tiny_start(data_dir):
    from lmlab.config import preset
    from lmlab.data import TokenData
    from lmlab.model import Transformer

    tok = TokenData(data_dir).tokenizer
    torch.manual_seed(3)
    cfg = preset("tiny-llama", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32, d_ff=64,
                 max_seq_len=32)
    return Transformer(cfg), tok


@pytest.mark.parametrize("kind", ["native", "hf"])
def test_init_from_checkpoint_starts_from_its_weights(tmp_path, data_dir, kind):
    from lmlab.checkpoints import hf, load, native
    from lmlab.train import train

    model, tok = tiny_start(data_dir)
    folder = (native.save if kind == "native" else hf.export)(model, tok, tmp_path / kind)
    base = [f"model.init_from={folder}", f"data.path={data_dir}", "seq_len=16", "eval_iters=1", "threads=1",
            "plot=false", "progress=false", "tensorboard=false", "batch_size=2"]
    summary = train(load_config(None, [*base, "max_iters=0", f"out_dir={tmp_path / 'zero'}"]))
    saved, _ = load(summary["model_dir"])
    assert saved.cfg.family == "llama" and saved.cfg.n_kv_head == 1
    for k, v in model.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k
    summary = train(load_config(None, [*base, "max_iters=3", "eval_interval=3", "model.dropout=0.1",
                                       "optim.warmup_iters=0", f"out_dir={tmp_path / 'three'}"]))
    trained, _ = load(summary["model_dir"])
    assert trained.cfg.dropout == 0.1 and summary["val_loss"] is not None
    assert not torch.equal(trained.state_dict()["decoder.blocks.0.attn.qkv.weight"],
                           model.state_dict()["decoder.blocks.0.attn.qkv.weight"])
    if kind == "native":  # a model whose ids mean other characters than the data's
        from lmlab.tokenizer import Tokenizer

        native.save(model, Tokenizer.char_level("zyxwvutsrqponmlkjihgfedcba 0123456789"), tmp_path / "other")
        with pytest.raises(LmlabError, match=r"the data's tokenizer .* is not model.init_from's: id 0"):
            train(load_config(None, [*base, "max_iters=0", f"model.init_from={tmp_path / 'other'}",
                                     f"out_dir={tmp_path / 'other-run'}"]))


BAD_OVERRIDES = {
    # name: (overrides, text the one-line message must contain)
    "n_layer-abc": (["model.n_layer=abc"], "model.n_layer: expected an integer, got 'abc'"),
    "n_head-0": (["model.n_head=0"], "n_head: 0 is out of range"),
    "lr-negative": (["optim.lr=-1"], "optim.lr: -1.0 is out of range (allowed: > 0)"),
    "lr-nan": (["optim.lr=.nan"], "optim.lr: nan is out of range"),
    "beta2-1": (["optim.beta2=1"], "optim.beta2: 1.0 is out of range (allowed: 0 <= beta2 < 1)"),
    "warmup-negative": (["optim.warmup_iters=-5"], "optim.warmup_iters: -5 is out of range"),
    "device-tpu": (["device=tpu"], "device: 'tpu' is not a device (allowed: auto, cpu, cuda, cuda:N"),
    "dtype-fp16": (["dtype=fp16"], "dtype: 'fp16' is not supported"),
    "seed-65-bits": ([f"seed={2**64}"], f"seed: {2**64} is out of range (allowed: 0..2**63-1)"),
    "seed-negative": (["seed=-1"], "seed: -1 is out of range"),
    "max-iters-negative": (["max_iters=-1"], "max_iters: -1 is out of range (allowed: >= 0)"),
    "val-fraction-1": (["data.val_fraction=1.5"], "data.val_fraction: 1.5 is out of range"),
    "warmup_iter-top-level": (["warmup_iter=5"], "unknown key 'warmup_iter' (did you mean 'optim.warmup_iters'?)"),
    "warmup_iter-in-optim": (["optim.warmup_iter=5"], "unknown key 'warmup_iter' (did you mean 'warmup_iters'?)"),
}


@pytest.mark.parametrize("case", BAD_OVERRIDES)
def test_bad_override_is_one_line(case):
    overrides, text = BAD_OVERRIDES[case]
    with pytest.raises(LmlabError) as info:
        load_config(None, overrides)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_recipe_top_level_warmup_iter_suggests_the_readme_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("warmup_iter: 5\n")
    with pytest.raises(LmlabError, match=r"unknown key 'warmup_iter' \(did you mean 'optim\.warmup_iters'\?\)"):
        load_config(recipe)
    recipe.write_bytes(b"max_iters: 5 # caf\xe9\n")
    with pytest.raises(LmlabError, match=f"^{recipe}: not UTF-8 text"):
        load_config(recipe)


@pytest.fixture
def tiny_run(tmp_path, data_dir):
    """Overrides of a 2-iteration run in tmp_path/run, already done once."""
    from lmlab.train import train

    base = [*TINY, f"data.path={data_dir}", f"out_dir={tmp_path / 'run'}", "max_iters=2", "eval_interval=2",
            "save_model=false", "log_interval=1"]
    train(load_config(None, base))
    return base


def test_torn_last_metrics_line_does_not_block_resume(tmp_path, tiny_run):
    from lmlab.train import train

    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"iter": 3, "split": "tr')  # killed mid-write
    train(load_config(None, [*tiny_run, "max_iters=4", "eval_interval=4"]))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole again
    assert [r["iter"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]


def test_damaged_metrics_line_in_the_middle_is_named(tmp_path, tiny_run):
    from lmlab.train import train

    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(LmlabError, match=f"^{metrics}:2: not a metrics row"):
        train(load_config(None, [*tiny_run, "max_iters=4", "eval_interval=4"]))


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"PK\x03\x04junk"])
def test_unreadable_ckpt_is_one_line(tmp_path, data_dir, content):
    from lmlab.train import train

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(content)
    with pytest.raises(LmlabError) as info:
        train(load_config(None, [*TINY, f"data.path={data_dir}", f"out_dir={tmp_path / 'run'}", "max_iters=2"]))
    assert str(info.value).startswith(f"{tmp_path / 'run' / 'ckpt.pt'}: cannot read checkpoint (")
    assert "\n" not in str(info.value)


def test_ckpt_without_training_state_is_named(tmp_path, data_dir):
    from lmlab.train import train

    (tmp_path / "run").mkdir()
    torch.save({"model": {}}, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(LmlabError, match=r"ckpt\.pt: not a training checkpoint \(lacks optim, iter, rng, model_cfg\)"):
        train(load_config(None, [*TINY, f"data.path={data_dir}", f"out_dir={tmp_path / 'run'}", "max_iters=2"]))


@pytest.mark.parametrize("damage,message", [
    (lambda st: st["model"].popitem(), r"ckpt\.pt: model state lacks tensor '[\w.]+'; move it aside or set resume=false"),
    (lambda st: st["model"].update(extra=torch.zeros(1)), r"ckpt\.pt: model state has unknown tensor 'extra'"),
    (lambda st: st["model"].update({k: torch.zeros(3) for k in list(st["model"])[:2]}),
     r"ckpt\.pt: model state has a different shape for tensor '[\w.]+' \(and 1 more\)"),
    (lambda st: st.update(model=[1, 2]), r"ckpt\.pt: damaged training checkpoint \(model is not a mapping of tensors\)"),
    (lambda st: st["optim"].update(param_groups=[]), r"ckpt\.pt: cannot restore the training state \("),
], ids=["missing", "unknown", "shape", "not-a-mapping", "optimizer"])
def test_ckpt_whose_state_does_not_fit_the_model_is_one_line(tmp_path, tiny_run, damage, message):
    from lmlab.train import train

    path = tmp_path / "run" / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    with pytest.raises(LmlabError, match=message) as info:
        train(load_config(None, [*tiny_run, "max_iters=4"]))
    assert "\n" not in str(info.value)


def test_unwritable_out_dir_fails_before_any_work(tmp_path, monkeypatch):
    from lmlab.train import train, trainer

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(trainer, "load_data", lambda *a: pytest.fail("data work started"))
    with pytest.raises(LmlabError, match=r"config\.yaml: cannot write here"):
        train(load_config(None, [*TINY, f"out_dir={tmp_path / 'file' / 'run'}", "max_iters=2"]))


def test_run_files_get_umask_permissions(tmp_path, tiny_run):
    from lmlab.train import train

    train(load_config(None, [*tiny_run, "max_iters=4", "eval_interval=4", "save_model=true"]))
    mask = os.umask(0)
    os.umask(mask)
    run = tmp_path / "run"
    for path in (run / "summary.json", run / "config.yaml", run / "ckpt.pt", run / "model" / "model.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    assert (run / "model").stat().st_mode & 0o777 == 0o777 & ~mask
