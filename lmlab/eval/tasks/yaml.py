"""Tasks from YAML files in lm-evaluation-harness's format (its core keys, over local files only).

`dataset_path: text` with `data_files` and `line_pattern` reads plain text lines split by a regular
expression's named groups. Every key is checked: an unknown key, a Python hook (`!function`, process_docs, ...), a missing
required key or a file that cannot be found is an LmlabError naming the file (and line or key).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError, first_line
from lmlab.eval.data import Docs, read_any, text_of
from lmlab.eval.tasks import files, filters, schema
from lmlab.eval.tasks.task import Task
from lmlab.eval.tasks.templates import template
from lmlab.utils.suggest import did_you_mean

YAML_KEYS = {
    "task", "dataset_path", "dataset_name", "data_files", "dataset_kwargs", "test_split", "validation_split",
    "training_split", "fewshot_split", "output_type", "doc_to_text", "doc_to_choice", "doc_to_target",
    "target_delimiter", "fewshot_delimiter", "num_fewshot", "generation_kwargs", "metric_list",
    "description", "fewshot_config", "filter_list", "tag", "group", "metadata", "should_decontaminate",
    "doc_to_decontamination_query", "repeats", "line_pattern",
}
UNSUPPORTED_KEYS = {"process_docs", "process_results", "class", "include", "doc_to_image", "doc_to_audio",
                    "custom_dataset", "unsafe_code"}
METRIC_OPTIONS = ("ignore_case", "ignore_punctuation")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The task file's mapping and the line of each (dotted) field."""
    import yaml

    if not path.is_file():
        raise LmlabError(f"{path}: task file not found")
    text = text_of(path)

    def hook(loader, node):  # the `!function` tag only: a value that merely mentions the word is text
        raise LmlabError(f"{path}:{node.start_mark.line + 1}: '!function' (a Python hook) is not supported; "
                         f"express the task with templates")

    loader = type("TaskLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", hook)
    reader = loader(text)  # a SafeLoader that refuses one more tag
    try:
        node = reader.get_single_node()
        cfg = reader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise LmlabError(f"{path}{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise LmlabError(f"{path}: YAML nested too deeply") from None
    finally:
        reader.dispose()
    if not isinstance(cfg, dict):
        raise LmlabError(f"{path}: a task file is a mapping of keys (task, dataset_path, doc_to_text, ...)")
    return cfg, schema.key_lines(node)


def _check_keys(cfg: dict[str, Any], path: Path) -> None:
    for key in cfg:
        if key in UNSUPPORTED_KEYS:
            raise LmlabError(f"{path}: key '{key}' (Python hooks and includes) is not supported; "
                             f"express the task with templates")
        if key not in YAML_KEYS:
            raise LmlabError(f"{path}: unknown key {str(key)!r}" + did_you_mean(str(key), YAML_KEYS))
    for key in ("task", "output_type", "doc_to_target"):
        if key not in cfg:
            raise LmlabError(f"{path}: missing required key '{key}'")


def _load_split(cfg: dict[str, Any], split: str, path: Path, data_dir: Path | None) -> Docs:
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise LmlabError(f"{path}: dataset_kwargs must be a mapping")
    dataset, spec = cfg.get("dataset_path"), cfg.get("data_files", kwargs.get("data_files"))
    if dataset == "text" and "line_pattern" not in cfg:
        raise LmlabError(f"{path}: dataset_path 'text' needs line_pattern (a regular expression whose named "
                         f"groups are the fields, e.g. '(?P<label>[^\\t]+)\\t(?P<text>.*)')")
    if dataset in ("json", "csv", "text"):
        if spec is None:
            raise LmlabError(f"{path}: dataset_path {dataset!r} needs data_files")
        by_split = spec if isinstance(spec, dict) else {"train": spec}
        if split not in by_split:
            raise LmlabError(f"{path}: split {split!r} is not in data_files (has {', '.join(by_split)})")
        paths = files.data_files(by_split[split], path, data_dir)
    elif isinstance(dataset, str):
        dataset, paths = None, files.split_files(dataset, split, path, data_dir)
    else:
        raise LmlabError(f"{path}: missing dataset_path (json, csv, text or a local folder)")
    docs = Docs([], [])
    for p in paths:
        if dataset == "text":
            docs = docs + read_pattern_lines(p, cfg["line_pattern"], path)
        else:
            docs = docs + read_any(p, None if dataset == "json" and p.suffix == ".jsonl" else dataset)
    return docs


def read_pattern_lines(data: Path, pattern: Any, path: Path) -> Docs:
    """`dataset_path: text`: every non-blank line of `data` must match `line_pattern` whole; its named
    groups are the document's fields (a user's "label<TAB>text" file works without code)."""
    import re

    try:
        rx = re.compile(str(pattern))
    except re.error as e:
        raise LmlabError(f"{path}: line_pattern {pattern!r} is not a valid regular expression "
                         f"({first_line(e)})") from None
    if not rx.groupindex:
        raise LmlabError(f"{path}: line_pattern {pattern!r} has no named groups (?P<field>...)")
    docs, origins = [], []
    for n, line in enumerate(text_of(data).split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        m = rx.fullmatch(line)
        if m is None:
            raise LmlabError(f"{data}:{n}: line does not match line_pattern {rx.pattern!r}: {line[:60]!r}")
        docs.append({k: (v or "") for k, v in m.groupdict().items()})
        origins.append(f"{data}:{n}")
    return Docs(docs, origins)


def _metrics(spec: Any, path: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    names, options = [], {}
    for m in spec or []:
        name = m.get("metric") if isinstance(m, dict) else m
        if not isinstance(name, str):
            raise LmlabError(f"{path}: metric_list entries are names or {{metric: NAME, ...}}, got {m!r}")
        names.append(name)
        if isinstance(m, dict):
            options[name] = {k: v for k, v in m.items() if k in METRIC_OPTIONS}
    return names, options


def load_yaml(path: str | Path, data_dir: str | Path | None = None) -> Task:
    path = Path(path)
    cfg, lines = _read(path)
    _check_keys(cfg, path)
    schema.check(cfg, path, lines)
    data_dir = Path(data_dir) if data_dir else None
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise LmlabError(f"{path}: needs test_split or validation_split")
    docs = _load_split(cfg, split, path, data_dir)
    if not len(docs):
        raise LmlabError(f"{path}: split {split!r} has no documents")
    few_split = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    few = docs if few_split in (None, split) else _load_split(cfg, few_split, path, data_dir)
    fields = set(docs.docs[0])
    source = str(path)
    metric_names, options = _metrics(cfg.get("metric_list"), path)
    few_cfg = cfg.get("fewshot_config") or {}
    return Task(
        name=str(cfg["task"]), docs=docs, output_type=cfg["output_type"], source=source,
        doc_to_text=template(cfg.get("doc_to_text", ""), source, "doc_to_text", fields=fields),
        doc_to_target=template(cfg["doc_to_target"], source, "doc_to_target", fields=fields),
        doc_to_choice=(template(cfg["doc_to_choice"], source, "doc_to_choice", fields=fields)
                       if "doc_to_choice" in cfg else None),
        fewshot_docs=few, num_fewshot=int(cfg.get("num_fewshot") or 0),
        fewshot_sampler=few_cfg.get("sampler", "random"),
        target_delimiter=cfg.get("target_delimiter", " "), fewshot_delimiter=cfg.get("fewshot_delimiter", "\n\n"),
        description=cfg.get("description", ""), generation_kwargs=dict(cfg.get("generation_kwargs") or {}),
        metrics=metric_names, metric_options=options, filters=filters.from_yaml(cfg.get("filter_list") or [], source),
    )
