"""Fine-tuning recipes: a typed YAML mirror of FinetuneConfig plus `key=value` overrides.

    task:    instruct (Alpaca JSON / chat jsonl, loss on responses) | classify (jsonl/csv text + label)
    model:   {init_from: smollm2-135m}            the weights to start from (lmlab.train's ModelSection)
    method:  lora | full
    lora:    {r, alpha, dropout, rslora, targets}  targets: LoRA target patterns (lmlab.adapters.lora)
    freeze:  [patterns]                            parameters to keep fixed (e.g. tok_emb, decoder.blocks.[0-3]);
    freeze_blocks: n                               and the first n blocks
    data:    DataSection                           files, split, fields, packing
    classify: {pooling, dropout}
    optim:   lmlab.train's OptimConfig (lr, warmup, schedule, clipping)
    eval_icl: {task, data_dir, split, limits, labels}  classify: also score on an `lmlab icl` task's test items
    resume:  continue from out_dir/ckpt.pt (written at every evaluation) when it exists
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmlab.errors import LmlabError
from lmlab.train.config import OptimConfig, apply_override, from_dict
from lmlab.train.model_section import ModelSection


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    rslora: bool = False
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "out", "gate", "up", "proj"])


@dataclass
class DataSection:
    train: str = ""  # instruct: Alpaca .json or chat .jsonl; classify: .jsonl or .csv
    val: str = ""  # held-out file; empty = the last val_fraction of train (after a seeded shuffle)
    val_fraction: float = 0.1
    limit: int = 0  # use only the first N records of train (0 = all)
    val_limit: int = 0  # and of the held-out set
    format: Literal["auto", "alpaca", "chat", "jsonl", "csv", "label-text"] = "auto"  # instruct: alpaca | chat;
    # classify: jsonl | csv | label-text ("<label> <text>" lines); auto: by the file's suffix
    system: str = ""  # instruct: a system message before each Alpaca record
    packing: bool = False  # instruct: several examples per row, no attention across them
    text_field: str = "text"  # classify
    label_field: str = "label"  # classify
    labels: list[str] = field(default_factory=list)  # classify: the label set (empty = from the data, sorted)


@dataclass
class ClassifySection:
    pooling: str = ""  # decoder: last | mean; encoder: cls | mean ("" = last / cls)
    dropout: float = 0.0


@dataclass
class EvalICLSection:
    """classify: after training, also score the classifier on an `lmlab icl` task's test items
    (lmlab.finetune.icl_eval), so it compares like for like with in-context results."""
    task: str = ""  # e.g. sst2 ("" = off)
    data_dir: str = ""
    split: str = ""  # "" = the task's default test split (sst2: dev)
    limits: list[int] = field(default_factory=lambda: [0])  # first N items (0 = all); one result per entry
    labels: list[str] = field(default_factory=list)  # the classifier label for each task label, in task order


@dataclass
class FinetuneConfig:
    task: Literal["instruct", "classify"] = "instruct"
    model: ModelSection = field(default_factory=lambda: ModelSection(init_from="smollm2-135m"))
    method: Literal["lora", "full"] = "lora"
    lora: LoraSection = field(default_factory=LoraSection)
    freeze: list[str] = field(default_factory=list)  # parameter/module patterns kept fixed (lmlab.adapters.freeze)
    freeze_blocks: int = 0  # also keep the first n blocks fixed
    data: DataSection = field(default_factory=DataSection)
    classify: ClassifySection = field(default_factory=ClassifySection)
    eval_icl: EvalICLSection = field(default_factory=EvalICLSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, min_lr=2e-5, weight_decay=0.0,
                                                                     warmup_iters=10))
    seq_len: int = 512  # longest example (tokens); packed rows are this long
    batch_size: int = 8  # examples per micro-step
    grad_accum: int = 1
    max_iters: int = 100
    eval_interval: int = 50
    log_interval: int = 10
    out_dir: str = "out/finetune"
    seed: int = 1337
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    resume: bool = True  # continue from out_dir/ckpt.pt when it exists (written at every evaluation)
    export_merged: bool = True  # also write an HF folder with LoRA merged in (<out_dir>/hf)
    export_base: bool = True  # LoRA: the base as an HF folder, for PEFT to load the adapter on (<out_dir>/hf-base)

    def __post_init__(self) -> None:
        if not self.model.init_from:
            raise LmlabError("config: model.init_from is required: fine-tuning starts from trained weights")
        if not self.data.train:
            raise LmlabError("config: data.train is empty (a training file is required)")
        for key in ("seq_len", "batch_size", "grad_accum", "max_iters", "eval_interval", "log_interval"):
            if getattr(self, key) < 1:
                raise LmlabError(f"config: {key} must be at least 1, got {getattr(self, key)}")
        if not 0 < self.data.val_fraction < 1 and not self.data.val:
            raise LmlabError(f"config: data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        fmts = ("auto", "alpaca", "chat") if self.task == "instruct" else ("auto", "jsonl", "csv", "label-text")
        if self.data.format not in fmts:
            raise LmlabError(f"config: data.format '{self.data.format}' is not for task {self.task} "
                             f"(choose {', '.join(fmts)})")
        if self.eval_icl.task and self.task != "classify":
            raise LmlabError("config: eval_icl is for task: classify only")
        if self.data.packing and self.task != "instruct":
            raise LmlabError("config: data.packing is for task: instruct only")
        self.model.check(self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}


def load_finetune_config(path: str | Path | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A FinetuneConfig from a YAML recipe and `key=value` overrides (applied in order)."""
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LmlabError(f"{path}: config file not found")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise LmlabError(f"{path}:{f' line {mark.line + 1}' if mark else ''} not valid YAML") from None
        if not isinstance(d, dict):
            raise LmlabError(f"{path}: expected a mapping at the top level")
        d = from_dict(FinetuneConfig, d, str(path)).to_dict()
    elif overrides:
        d = _defaults()
    for item in overrides or []:
        apply_override(d, item)
    return from_dict(FinetuneConfig, d)


def _defaults() -> dict[str, Any]:
    """The defaults as a dict, without the checks that need data.train (so overrides can set it)."""
    out = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
           for f in dataclasses.fields(FinetuneConfig)}
    out = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, ModelSection) else v)
           for k, v in out.items()}
    out["model"] = out["model"].to_dict()
    return out


def dump_finetune_config(cfg: FinetuneConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
