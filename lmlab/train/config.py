"""Training configuration: dataclasses that a YAML recipe mirrors key for key, plus `key=value` overrides.

    model:      ModelSection {preset: baby-gpt, n_layer: 4, ...} or {init_from: PATH, ...}
    data:       DataConfig   (a prepared folder, or corpus files prepared on first use)
    objectives: [{name: clm, weight: 1.0, ...}]      see lmlab.objectives
    optim:      OptimConfig
    everything else: TrainConfig's own fields (batch_size, seq_len, max_iters, ...)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import LmlabError
from lmlab.objectives import ObjectiveConfig, objective_config
from lmlab.train.fields import check_value
from lmlab.train.model_section import ModelSection
from lmlab.utils.suggest import did_you_mean


@dataclass
class DataConfig:
    path: str = ""  # a folder written by `lmlab prepare`; empty = <out_dir>/data, prepared from `corpus`
    corpus: list[str] = field(default_factory=list)  # files/folders/globs to prepare when `path` is not prepared yet
    tokenizer: str = ""  # char | a tokenizer.json or folder | a model spec; "" = model.init_from's, else char
    doc_boundary: str = "file"  # file | blank_line | line
    val_fraction: float = 0.1
    workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1  # on matrices only; never on norms, biases (or embeddings, unless below)
    decay_embeddings: bool = False  # true = nanoGPT's rule: every matrix decays, embeddings included
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0 = max_iters
    decay_lr: bool = True
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="baby-gpt"))
    data: DataConfig = field(default_factory=DataConfig)
    objectives: list[ObjectiveConfig] = field(default_factory=lambda: [ObjectiveConfig()])
    mixture: str = "sum"  # sum: weighted sum of every objective each step | sample: one per micro-batch
    optim: OptimConfig = field(default_factory=OptimConfig)
    seq_len: int = 64
    batch_size: int = 12  # per process, per micro-step
    grad_accum: int = 1
    max_iters: int = 2000
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0 = at every evaluation
    out_dir: str = "out"
    resume: bool = True  # continue from <out_dir>/ckpt.pt when it exists
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 where the GPU has it, else float32) | float32 | bfloat16
    compile: bool = False
    scaled_residual_init: bool = True  # GPT-2: output projections of residual branches get std 0.02/sqrt(2·layers)
    threads: int = 0  # CPU threads for torch (0 = torch's default; 1 is fastest on a busy shared machine)
    distributed: str = "ddp"  # under torchrun: ddp | fsdp
    deterministic: bool = False
    tensorboard: bool = True  # when the tensorboard package is installed
    plot: bool = True  # loss-curve PNG when matplotlib is installed
    progress: bool = True
    peak_flops: float = 0.0  # per device, for MFU; 0 = a guess from the device
    save_model: bool = True  # final model in lmlab's native format at <out_dir>/model

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelSection.from_dict(self.model)
        if self.mixture not in ("sum", "sample"):
            raise LmlabError(f"config: mixture must be 'sum' or 'sample', got '{self.mixture}'")
        if self.distributed not in ("ddp", "fsdp"):
            raise LmlabError(f"config: distributed must be 'ddp' or 'fsdp', got '{self.distributed}'")
        if not DEVICE.fullmatch(self.device):
            raise LmlabError(f"config: device: {self.device!r} is not a device (allowed: auto, cpu, cuda, cuda:N, "
                             "mps, xpu)")
        if self.dtype not in DTYPES:
            raise LmlabError(f"config: dtype: {self.dtype!r} is not supported (allowed: {', '.join(DTYPES)})"
                             f"{did_you_mean(self.dtype, DTYPES)}")
        if not self.objectives:
            raise LmlabError("config: objectives is empty")
        for key in ("batch_size", "grad_accum", "seq_len", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, key) < 1:
                raise LmlabError(f"config: {key} must be at least 1, got {getattr(self, key)}")
        self.model.check(self.seq_len)

    @property
    def tokenizer(self) -> str:
        """The tokenizer the data is prepared with."""
        return self.data.tokenizer or self.model.init_from or "char"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "model": self.model.to_dict()}


def _unknown(source: str, key: str, known, nested: dict[str, Any] | None = None) -> LmlabError:
    """Unknown `key`, with the closest known name; `nested` sections' keys count too (as section.key), so
    a top-level `warmup_iter` suggests `optim.warmup_iters`."""
    names = {k: k for k in known}
    for section, value in (nested or {}).items():
        if isinstance(value, dict) and section != "model":
            names.update({k: f"{section}.{k}" for k in value if k not in names})
    hint = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return LmlabError(f"{source}: unknown key {key!r}" + (f" (did you mean '{names[hint[0]]}'?)" if hint else ""))


# Ranges of numeric recipe values (dotted path → allowed, as text and as a test); types are checked first.
LIMITS: dict[str, tuple[str, Any]] = {
    **{f"optim.{k}": (">= 0", lambda v: v >= 0) for k in ("min_lr", "weight_decay", "warmup_iters",
                                                           "lr_decay_iters", "grad_clip")},
    "optim.lr": ("> 0", lambda v: v > 0),
    "optim.eps": ("> 0", lambda v: v > 0),
    "optim.beta1": ("0 <= beta1 < 1", lambda v: 0 <= v < 1),
    "optim.beta2": ("0 <= beta2 < 1", lambda v: 0 <= v < 1),
    "data.val_fraction": ("0 <= val_fraction < 1", lambda v: 0 <= v < 1),
    "data.workers": (">= 1", lambda v: v >= 1),
    **{k: (">= 1", lambda v: v >= 1) for k in ("seq_len", "batch_size", "grad_accum", "eval_interval",
                                               "eval_iters", "log_interval")},
    **{k: (">= 0", lambda v: v >= 0) for k in ("max_iters", "checkpoint_interval")},  # 0 iterations: init_from as is
    "threads": (">= 0", lambda v: v >= 0),
    "peak_flops": (">= 0", lambda v: v >= 0),
    "seed": ("0..2**63-1", lambda v: 0 <= v < 2**63),
}
DEVICE = re.compile(r"auto|cpu|mps|xpu|cuda(:\d+)?")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_limits(where: str, path: str, value: Any) -> None:
    if path in LIMITS and isinstance(value, (int, float)) and not isinstance(value, bool):
        allowed, ok = LIMITS[path]
        if not math.isfinite(value) or not ok(value):
            raise LmlabError(f"{where}: {value!r} is out of range (allowed: {allowed})")


def from_dict(cls, d: Any, source: str = "config", prefix: str = ""):
    """A dataclass from nested dicts; an unknown key is named with the closest known one."""
    if not isinstance(d, dict):
        raise LmlabError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            nested = None if prefix else TrainConfig().to_dict() if cls is TrainConfig else None
            raise _unknown(f"{source}: {prefix}" if prefix else source, key, fields, nested)
        kind = hints[key]
        where = f"{source}: {prefix}{key}"
        if kind is ModelSection:
            value = ModelSection.from_dict(value, source)
        elif dataclasses.is_dataclass(kind):
            value = from_dict(kind, value or {}, source, f"{prefix}{key}.")
        elif key == "objectives":
            if not isinstance(value, list):
                raise LmlabError(f"{where}: expected a list of objectives")
            value = [objective_config(v if isinstance(v, dict) else {"name": v}, f"{where}[{i}]")
                     for i, v in enumerate(value)]
        else:
            value = check_value(where, kind, value)
            check_limits(where, f"{prefix}{key}", value)
        kwargs[key] = value
    return cls(**kwargs)


def apply_override(d: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML; list items by index: objectives.0.weight=2)."""
    if "=" not in item:
        raise LmlabError(f"override '{item}': expected key=value")
    path, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    keys = path.split(".")
    node: Any = d
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise LmlabError(f"override '{item}': no item {key} in {'.'.join(keys[:i])} (it has {len(node)})")
            node = node[int(key)]
        elif isinstance(node, dict):
            if key not in node:
                raise _unknown(f"override '{item}'", key, node, d if node is d else None)
            node = node[key]
        else:
            raise _not_section(item, keys[:i], node)
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise LmlabError(f"override '{item}': no item {last} in {'.'.join(keys[:-1])}")
        node[int(last)] = value
    elif isinstance(node, dict):
        if node is not d.get("model") and last not in node:  # model overrides may add any ModelConfig field
            raise _unknown(f"override '{item}'", last, node, d if node is d else None)
        if node is d.get("model") and last in ("preset", "init_from"):  # the two are alternatives
            node.pop("init_from" if last == "preset" else "preset", None)
        node[last] = value
    else:
        raise _not_section(item, keys[:-1], node)


def _not_section(item: str, path: list[str], value: Any) -> LmlabError:
    return LmlabError(f"override '{item}': {'.'.join(path)} is a value ({value!r}), not a section with keys")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from an optional YAML recipe and `key=value` overrides (applied in order)."""
    d = TrainConfig().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LmlabError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise LmlabError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise LmlabError(f"{path}:{where} not valid YAML") from None
        if not isinstance(loaded, dict):
            raise LmlabError(f"{path}: expected a mapping at the top level")
        d = from_dict(TrainConfig, loaded, str(path)).to_dict()  # names unknown keys against the file
    for item in overrides or []:
        apply_override(d, item)
    return from_dict(TrainConfig, d)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
