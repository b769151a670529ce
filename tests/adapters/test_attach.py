"""`--adapter DIR` on generate, chat, eval and icl: a tiny GGUF model plus a LoRA adapter gives the output
of the merged model (saved as a plain checkpoint) and not the base's; adapters lmlab or PEFT wrote both
load; an adapter for another base, or with missing or extra tensors, is a one-line error naming it."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmlab import cli
from lmlab.adapters import inject_lora, lora_modules, unload_lora
from lmlab.adapters.attach import attach_adapter
from lmlab.adapters.peft import CONFIG_NAME, WEIGHTS_NAME, peft_slices, save_peft
from lmlab.checkpoints import load, native
from lmlab.errors import LmlabError
from lmlab.inference.load import RunConfig, load as load_run
from tiny_gguf import write_tiny

SST2 = ["1 a gorgeous , witty , seductive movie .", "0 the story is bogus and its characters tissue-thin .",
        "1 an utterly charming and hilarious film .", "0 it 's a cookie-cutter movie , a cut-and-paste job ."]


def adapted(model, seed=1, std=0.5):
    inject_lora(model, ["q", "v", "gate", "up"], r=4, alpha=8, slices_of=peft_slices(model.cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    write_tiny(root / "tiny.gguf")
    model, tok = load(str(root / "tiny.gguf"))
    adapted(model)
    save_peft(model, root / "run" / "adapter", base_name="tiny.gguf")  # as lmlab finetune's out_dir/adapter
    unload_lora(model, merge=True)
    native.save(model, tok, root / "merged")
    (root / "data" / "sst2").mkdir(parents=True)
    for split in ("train", "dev"):
        (root / "data" / "sst2" / f"stsa.binary.{split}").write_text("\n".join(SST2) + "\n")
    (root / "mc.jsonl").write_text("".join(json.dumps({"q": q, "choices": ["yes", "no"], "gold": i % 2}) + "\n"
                                           for i, q in enumerate(["The quick brown", "Paris is the", "Numbers like"])))
    (root / "mc.yaml").write_text(f"task: mc\ndataset_path: json\ndata_files: {{test: {root / 'mc.jsonl'}}}\n"
                                  "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
                                  "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n")
    return root


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    return out.out


def three_ways(setup, capsys, make_args, **kw):
    """(base, with --adapter, merged) outputs of one command."""
    gguf = setup / "tiny.gguf"
    return (run(capsys, *make_args(gguf, []), **kw), run(capsys, *make_args(gguf, ["--adapter", setup / "run"]), **kw),
            run(capsys, *make_args(setup / "merged", []), **kw))


def test_generate_and_chat_with_adapter_equal_merged_model(setup, capsys, monkeypatch):
    gen = lambda m, extra: ["generate", "-m", m, "-p", "The quick", "--max-new-tokens", "8", "--temperature", "0",
                            "--threads", "1", *extra]
    base, with_adapter, merged = three_ways(setup, capsys, gen)
    assert with_adapter == merged and with_adapter != base
    chat = lambda m, extra: ["chat", "-m", m, "--max-new-tokens", "6", "--temperature", "0", "--threads", "1", *extra]
    base, with_adapter, merged = three_ways(setup, capsys, chat, stdin="hello\n", monkeypatch=monkeypatch)
    assert with_adapter == merged and with_adapter != base


def test_eval_with_adapter_equals_merged_model(setup, capsys, tmp_path):
    def logliks(m, extra, name):
        out = tmp_path / f"{name}.json"
        run(capsys, "eval", "-m", m, "--tasks", setup / "mc.yaml", "--output", out, "--log-samples", "--threads", "1",
            *extra)
        rows = [json.loads(x) for x in (tmp_path / f"{name}_samples_mc.jsonl").read_text().splitlines()]
        return torch.tensor([[float(r[0]) for r in row["resps"]] for row in rows])

    base = logliks(setup / "tiny.gguf", [], "base")
    with_adapter = logliks(setup / "tiny.gguf", ["--adapter", setup / "run" / "adapter"], "adapter")
    merged = logliks(setup / "merged", [], "merged")
    assert (with_adapter - merged).abs().max() <= 1e-4
    assert (with_adapter - base).abs().max() > 1e-2


def test_icl_with_adapter_equals_merged_model(setup, capsys, tmp_path):
    def generated(m, extra, name):
        out = tmp_path / f"{name}.json"
        run(capsys, "icl", "-m", m, "--task", "sst2", "--data-dir", setup / "data", "--shots", "0", "--seeds", "1",
            "--scoring", "generate", "--output", out, "--log-demos", "--threads", "1", *extra)
        return [json.loads(x)["generated"] for x in (tmp_path / f"{name}_demos.jsonl").read_text().splitlines()]

    base = generated(setup / "tiny.gguf", [], "base")
    with_adapter = generated(setup / "tiny.gguf", ["--adapter", setup / "run"], "adapter")
    assert with_adapter == generated(setup / "merged", [], "merged") and with_adapter != base


def test_adapter_peft_wrote_loads_like_lmlabs(setup):
    """PEFT's own layout: `.default`-free names, no lmlab metadata; the same weights give the same model."""
    pytest.importorskip("peft")
    peft_dir = setup / "peft-made"
    peft_dir.mkdir(exist_ok=True)
    conf = json.loads((setup / "run" / "adapter" / CONFIG_NAME).read_text())
    conf["base_model_name_or_path"] = "some/hf-folder"
    (peft_dir / CONFIG_NAME).write_text(json.dumps(conf))
    save_file(load_file(str(setup / "run" / "adapter" / WEIGHTS_NAME)), str(peft_dir / WEIGHTS_NAME))  # no metadata
    a, _ = load_run(str(setup / "tiny.gguf"), RunConfig(adapter=str(peft_dir)))
    b, _ = load_run(str(setup / "merged"), RunConfig())
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        assert (a.model(ids) - b.model(ids)).abs().max() <= 1e-5


def test_adapter_for_another_base_names_both(setup, tmp_path):
    write_tiny(tmp_path / "other.gguf", seed=7)
    other, tok = load(str(tmp_path / "other.gguf"))
    with pytest.raises(LmlabError, match=r"made for base model 'tiny.gguf', not for 'other.gguf' \(its token embeddings"):
        attach_adapter(other, setup / "run", "other.gguf")
    # a different shape: the embedding table and the projections do not fit
    from lmlab.config import preset
    from lmlab.model import Transformer

    wide = Transformer(preset("tiny-llama", vocab_size=tok.vocab_size, d_model=48))
    with pytest.raises(LmlabError, match=r"made for base model 'tiny.gguf', not for 'wide' \(vocabulary × width"):
        attach_adapter(wide, setup / "run", "wide")


def test_adapter_with_missing_or_extra_tensors(setup, tmp_path):
    model, _ = load(str(setup / "tiny.gguf"))
    tensors = load_file(str(setup / "run" / "adapter" / WEIGHTS_NAME))
    first = sorted(k for k in tensors if k.endswith("q_proj.lora_A.weight"))[0]

    def folder(name, sd):
        d = tmp_path / name
        d.mkdir()
        (d / CONFIG_NAME).write_text((setup / "run" / "adapter" / CONFIG_NAME).read_text())
        save_file(sd, str(d / WEIGHTS_NAME))
        return d

    missing_pair = {k: v for k, v in tensors.items() if not k.startswith(first[:-len("lora_A.weight")])}
    with pytest.raises(LmlabError, match=r"missing LoRA tensors for 1 module\(s\) that target_modules selects: .*q_proj"):
        attach_adapter(model, folder("missing", missing_pair), "tiny")
    only_a = {k: v for k, v in tensors.items() if k != first.replace("lora_A", "lora_B")}
    with pytest.raises(LmlabError, match=r"missing tensor '.*q_proj\.lora_B\.weight'"):
        attach_adapter(model, folder("half", only_a), "tiny")
    extra = {**tensors, first.replace("q_proj", "k_proj"): tensors[first].clone(),
             first.replace("q_proj", "k_proj").replace("lora_A", "lora_B"): torch.zeros(16, 4)}
    with pytest.raises(LmlabError, match=r"unexpected LoRA tensor pair\(s\) for module\(s\) target_modules does not select"):
        attach_adapter(model, folder("extra", extra), "tiny")
    with pytest.raises(LmlabError, match="unexpected tensor"):
        attach_adapter(model, folder("stray", {**tensors, "base_model.model.foo.weight": torch.zeros(2)}), "tiny")
    assert not lora_modules(model)  # every refusal left the model untouched


def test_adapter_folder_errors(setup, tmp_path, capsys):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / CONFIG_NAME).write_text("{}")
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    for path, message in ((tmp_path / "nowhere", "no such folder"), (tmp_path, f"no {CONFIG_NAME}"),
                          (tmp_path / "pickled", "adapter_model.bin is a pickle")):
        with pytest.raises(SystemExit):
            cli.main(["generate", "-m", str(setup / "tiny.gguf"), "-p", "x", "--adapter", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_base_probe_of_a_large_embedding():
    """SmolLM2's 49152×576 table: float32 positions would overrun it (the run that found this crashed at save)."""
    from types import SimpleNamespace

    from lmlab.adapters.peft import PROBE_SIZE, base_probe

    backbone = SimpleNamespace(tok_emb=torch.nn.Embedding(49152, 576),
                               cfg=SimpleNamespace(name="x", vocab_size=49152, d_model=576))
    probe = base_probe(backbone)["probe"]
    assert len(probe) == PROBE_SIZE and probe[-1] == pytest.approx(float(backbone.tok_emb.weight[-1, -1]), abs=1e-6)
