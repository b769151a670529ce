"""Each configs/finetune-*.yaml recipe runs on its real model (SmolLM2-135M, all-MiniLM-L6-v2) and shared data,
a few iterations on a tiny subset: the recipe, the model's tokenizer/chat template and the data fit together.
The LoRA classification adapter is then checked against HF PEFT on the base export (slow: real models)."""
import json
from pathlib import Path

import pytest
import torch

from lmlab import hub
from lmlab.errors import LmlabError
from lmlab.finetune.command import finetune

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY = ["max_iters=2", "eval_interval=2", "log_interval=1", "batch_size=2", "grad_accum=1", "seq_len=128",
        "data.limit=16", "data.val_limit=4", "progress=false", "threads=1"]
CASES = {"finetune-lora-smollm2-alpaca": ("smollm2-135m", "sft/alpaca_en_demo.json", None),
         "finetune-cls-minilm-sst2": ("all-minilm-l6-v2", "icl/sst2/stsa.binary.train", "icl/sst2/stsa.binary.dev"),
         "finetune-cls-smollm2-sst2": ("smollm2-135m", "icl/sst2/stsa.binary.train", "icl/sst2/stsa.binary.dev")}


@pytest.mark.parametrize("recipe", list(CASES))
def test_recipe_smoke_run(tmp_path, shared_data, recipe):
    model, train, val = CASES[recipe]
    try:
        hub.resolve(model)
    except LmlabError as e:
        pytest.skip(f"{model} not available: {e}")
    data = [f"data.train={shared_data / train}"] + ([f"data.val={shared_data / val}"] if val else [])
    peft_check = recipe == "finetune-cls-smollm2-sst2"
    exports = [] if peft_check or "minilm" in recipe else ["export_base=false", "export_merged=false"]
    summary = finetune(str(ROOT / "configs" / f"{recipe}.yaml"), [*TINY, *data, *exports, f"out_dir={tmp_path}"])
    assert summary["iters"] == 2 and summary["val_loss"] > 0
    if "lora" in recipe or "smollm2" in recipe:
        conf = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
        assert conf["base_model_name_or_path"] == "smollm2-135m"
    if peft_check:
        transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(tmp_path / "hf-base"), num_labels=2, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(tmp_path / "hf"), dtype=torch.float32).eval()
        ids = torch.tensor([[1, 504, 2104, 9057, 30, 2]])
        with torch.no_grad():
            a, b = theirs(input_ids=ids).logits, merged(input_ids=ids).logits
        assert (a - b).abs().max() <= 1e-4


def test_smollm2_template_supervises_only_the_answer():
    from lmlab.checkpoints.gguf import metadata, open_gguf
    from lmlab.finetune.instruct import IGNORE, encode_all
    from lmlab.tokenizer import Tokenizer

    try:
        path = hub.resolve("smollm2-135m")
    except LmlabError as e:
        pytest.skip(f"smollm2-135m not available: {e}")
    tok = Tokenizer.from_gguf_metadata(metadata(open_gguf(path), str(path)))
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}]
    [ex] = encode_all(tok, [conv])
    targets = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(targets, skip_special_tokens=False) == "Hello! How can I help?<|im_end|>\nYes.<|im_end|>\n"
