"""lmlab.finetune.runner/command: each recipe runs end to end (tiny models and data subsets); the adapter it
writes, loaded by lmlab on the HF base it writes, equals the merged HF folder it writes."""
import json
import string
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken

from lmlab.adapters.peft import load_peft
from lmlab.checkpoints import load
from lmlab.checkpoints.native import save
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.finetune.command import finetune
from lmlab.finetune.config import load_finetune_config
from lmlab.finetune.heads import SequenceClassifier
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer

from test_finetune_instruct import CHATML

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"alpaca": ROOT / "configs/finetune-lora-smollm2-alpaca.yaml",
           "minilm": ROOT / "configs/finetune-cls-minilm-sst2.yaml",
           "smollm2-cls": ROOT / "configs/finetune-cls-smollm2-sst2.yaml"}
FAST = ["max_iters=3", "eval_interval=2", "log_interval=1", "batch_size=2", "seq_len=96", "progress=false",
        "data.limit=12", "data.val_limit=4", "threads=1"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny llama and a tiny BERT with a character tokenizer that has ChatML tokens and template."""
    root = tmp_path_factory.mktemp("models")
    tok = Tokenizer.char_level(string.printable)
    tok.tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ("<|im_start|>", "<|im_end|>")])
    tok.eos_id = tok.pad_id = tok.tok.token_to_id("<|im_end|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    V = tok.vocab_size
    llama = Transformer(preset("tiny-llama", vocab_size=V, eos_id=tok.eos_id, pad_id=tok.pad_id))
    bert = Transformer(preset("bert-base", vocab_size=V, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=128,
                              pad_id=tok.pad_id))
    return {"llama": save(llama, tok, root / "llama"), "bert": save(bert, tok, root / "bert")}


def sst_lines(path: Path, n=20):
    path.write_text("".join(f"{i % 2} {'a fine film' if i % 2 else 'dull and long'} number {i} .\n" for i in range(n)))
    return path


def test_lora_instruction_recipe_end_to_end(tmp_path, tiny_models):
    out = tmp_path / "run"
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else "Show the sum.",
                                 "output": f"{i} + {i + 1} = {2 * i + 1}."} for i in range(16)]))
    summary = finetune(str(RECIPES["alpaca"]), [f"model.init_from={tiny_models['llama']}", f"data.train={data}",
                                                 f"out_dir={out}", "optim.lr=1e-2", *FAST, "seq_len=256"])
    assert summary["val_loss"] < summary["start_val_loss"]  # it learns something even in 3 steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["split"] == "eval"] == [0, 2, 3]
    conf = json.loads((out / "adapter/adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM" and conf["r"] == 16
    # lmlab: base + adapter == merged export
    base, _ = load(str(out / "hf-base"))
    load_peft(base, out / "adapter")
    merged, _ = load(str(out / "hf"))
    ids = torch.randint(0, base.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (base(ids) - merged(ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("recipe,model", [("smollm2-cls", "llama"), ("minilm", "bert")])
def test_classification_recipes_end_to_end(tmp_path, tiny_models, recipe, model):
    out = tmp_path / "run"
    train, dev = sst_lines(tmp_path / "train.txt"), sst_lines(tmp_path / "dev.txt", 6)
    summary = finetune(str(RECIPES[recipe]), [f"model.init_from={tiny_models[model]}", f"data.train={train}",
                                              f"data.val={dev}", f"out_dir={out}", *FAST])
    assert 0 <= summary["val_accuracy"] <= 1 and summary["val_loss"] > 0
    hf = pytest.importorskip("transformers")
    theirs = hf.AutoModelForSequenceClassification.from_pretrained(str(out / "hf"), dtype=torch.float32).eval()
    assert theirs.config.id2label == {0: "0", 1: "1"}
    if recipe == "smollm2-cls":  # LoRA: the adapter (with its head) on the base equals the merged export
        backbone, _ = load(str(out / "hf-base"))
        ours = SequenceClassifier(backbone, ["0", "1"])
        load_peft(ours, out / "adapter")
        ids = torch.randint(3, backbone.cfg.vocab_size, (2, 10))
        with torch.no_grad():
            assert (ours(ids) - theirs(input_ids=ids).logits).abs().max() <= 1e-4


def test_recipes_parse_and_bad_overrides_are_named(tmp_path):
    for path in RECIPES.values():
        cfg = load_finetune_config(path)
        assert cfg.model.init_from and cfg.data.train
    with pytest.raises(LmlabError, match="unknown key 'rr'.*did you mean 'r'"):
        load_finetune_config(RECIPES["alpaca"], ["lora.rr=4"])
    with pytest.raises(LmlabError, match="data.format 'alpaca' is not for task classify"):
        load_finetune_config(RECIPES["minilm"], ["data.format=alpaca"])
    with pytest.raises(LmlabError, match="model.init_from is required"):
        load_finetune_config(None, ["data.train=x.json", "model.preset=baby-gpt"])


def test_lora_target_matching_nothing_lists_what_exists(tmp_path, tiny_models):
    with pytest.raises(LmlabError, match="lora target 'query' matches no linear layer.*short names: q, k, v"):
        finetune(str(RECIPES["smollm2-cls"]), [f"model.init_from={tiny_models['llama']}", "lora.targets=[query]",
                                               f"data.train={sst_lines(tmp_path / 't.txt')}", "data.val=",
                                               f"out_dir={tmp_path}", *FAST])


def test_full_finetuning_with_frozen_blocks_trains_only_the_rest(tmp_path, tiny_models):
    from lmlab.finetune.runner import build

    cfg = load_finetune_config(RECIPES["smollm2-cls"], [f"model.init_from={tiny_models['llama']}", "method=full",
                                                         "freeze=[tok_emb]", "freeze_blocks=1",
                                                         f"data.train={sst_lines(tmp_path / 't.txt')}", "data.val=",
                                                         *FAST])
    _, model, _ = build(cfg)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.tok_emb.weight" in frozen and "backbone.decoder.blocks.0.attn.qkv.weight" in frozen
    assert "backbone.decoder.blocks.1.attn.qkv.weight" not in frozen and "head.weight" not in frozen


def test_command_registers_a_subparser():
    import argparse

    from lmlab.finetune.command import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--config", "x.yaml", "lora.r=4", "max_iters=2"])
    assert args.config == "x.yaml" and args.overrides == ["lora.r=4", "max_iters=2"] and callable(args.func)


def test_print_config(capsys):
    import argparse

    from lmlab.finetune.command import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "-c", str(RECIPES["alpaca"]), "--print-config", "lora.r=4"])
    assert args.func(args) == 0
    assert "  r: 4\n" in capsys.readouterr().out


def test_resume_continues_exactly_and_refuses_a_changed_run(tmp_path, tiny_models):
    """Stopping after 2 steps and rerunning to 4 gives the adapter of one 4-step run (the trainer's atomic
    checkpoint: trained parameters, optimizer, step, data generator, RNG with LoRA dropout on)."""
    from safetensors.torch import load_file

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i}."} for i in range(12)]))
    common = [f"model.init_from={tiny_models['llama']}", f"data.train={data}", "optim.lr=1e-2",
              "optim.lr_decay_iters=4", "lora.dropout=0.2", *FAST, "seq_len=256", "eval_interval=2"]
    finetune(str(RECIPES["alpaca"]), [*common, f"out_dir={tmp_path / 'one'}", "max_iters=4"])
    finetune(str(RECIPES["alpaca"]), [*common, f"out_dir={tmp_path / 'two'}", "max_iters=2"])
    summary = finetune(str(RECIPES["alpaca"]), [*common, f"out_dir={tmp_path / 'two'}", "max_iters=4"])
    assert summary["trained_from"] == 2
    a = load_file(str(tmp_path / "one/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["split"] == "eval"] == [0, 2, 4]
    with pytest.raises(LmlabError, match="cannot resume: checkpoint has model lora_r=16, config now gives lora_r=4"):
        finetune(str(RECIPES["alpaca"]), [*common, f"out_dir={tmp_path / 'two'}", "max_iters=6", "lora.r=4"])


def test_classifier_scored_on_the_icl_task_items(tmp_path, tiny_models):
    """eval_icl: the fine-tuned classifier on `lmlab icl`'s sst2 dev items (its reader, order and label names);
    over all items it is the held-out accuracy of the same file, over the first N the first N's."""
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    train, dev = sst_lines(data / "stsa.binary.train"), sst_lines(data / "stsa.binary.dev", 10)
    summary = finetune(str(RECIPES["minilm"]), [f"model.init_from={tiny_models['bert']}", f"data.train={train}",
                                                f"data.val={dev}", f"out_dir={tmp_path / 'run'}", *FAST,
                                                "data.val_limit=0", "eval_icl.task=sst2",
                                                f"eval_icl.data_dir={tmp_path / 'data'}", "eval_icl.limits=[4, 0]"])
    first4, every = summary["eval_icl"]
    assert (first4["n"], every["n"]) == (4, 10) and every["task"] == "sst2"
    assert every["acc"] == pytest.approx(summary["val_accuracy"])
    assert sum(every["predictions"].values()) == 10 and set(every["predictions"]) == {"negative", "positive"}
    items = [json.loads(x) for x in (tmp_path / "run" / "eval_icl_sst2_10.jsonl").read_text().splitlines()]
    assert [r["origin"] for r in items] == [f"{dev}:{n}" for n in range(1, 11)]
    assert sum(r["label"] == r["prediction"] for r in items) / 10 == pytest.approx(every["acc"])
    with pytest.raises(LmlabError, match="eval_icl is for task: classify only"):
        load_finetune_config(RECIPES["alpaca"], ["eval_icl.task=sst2"])
