"""A task: documents, how to turn each into requests, and how to score the answers.

Built-in tasks (lmlab.eval.tasks) construct `Task` directly with Python callables; a YAML file uses
the core keys of lm-evaluation-harness task files (see `load_yaml`), its templates in Jinja2.
"""
from __future__ import annotations

import ast
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.eval import fewshot, metrics
from lmlab.eval.data import Docs, read_any
from lmlab.eval.requests import GenerateUntil, Loglikelihood, LoglikelihoodRolling

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "loglikelihood": ["perplexity", "acc"],
                   "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
                   "generate_until": ["exact_match"]}
KNOWN_METRICS = set(metrics.AGGREGATE)


@dataclass
class Item:
    """One scored document with its requests (answers are filled in by the evaluator)."""

    index: int
    doc: dict[str, Any]
    requests: list
    gold: Any = None
    choices: list[str] | None = None
    target: str | None = None


@dataclass
class Task:
    name: str
    docs: Docs
    output_type: str
    doc_to_text: Callable[[dict], Any]
    doc_to_target: Callable[[dict], Any]
    doc_to_choice: Callable[[dict], list[str]] | None = None
    fewshot_docs: Docs | None = None
    num_fewshot: int = 0
    fewshot_sampler: str = "random"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    multiple_inputs: bool = False  # choices are contexts completed by one target (winogrande)
    filters: dict[str, Callable[[str], str]] = field(default_factory=dict)  # generation answer filters
    doc_to_answer: Callable[[dict], str] | None = None  # generation: the scored answer, when it differs
    # from the few-shot target (gsm8k: the number after '####', while examples show the reasoning)
    count_text: Callable[[dict], str] | None = None  # rolling: the text whose words/bytes are counted,
    # when it is not the scored text (wikitext counts the original text, before detokenization)
    group: str | None = None  # suite this task belongs to (mmlu, ceval, ...)
    source: str = ""  # file that defines the task, for error messages

    def __post_init__(self) -> None:
        if self.output_type not in OUTPUT_TYPES:
            raise LmlabError(f"{self.source or self.name}: output_type '{self.output_type}' is not one of "
                             f"{', '.join(OUTPUT_TYPES)}")
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            raise LmlabError(f"{self.source or self.name}: a multiple_choice task needs doc_to_choice")
        self.metrics = self.metrics or list(DEFAULT_METRICS[self.output_type])
        for m in self.metrics:
            if m not in KNOWN_METRICS:
                raise LmlabError(f"{self.source or self.name}: unknown metric '{m}' "
                                 f"(known: {', '.join(sorted(KNOWN_METRICS))})")
        if not len(self.docs):
            raise LmlabError(f"{self.source or self.name}: the evaluation split has no documents")

    # ------------------------------------------------------------------ prompts
    def _render(self, fn: Callable, doc: dict, origin: str, what: str) -> Any:
        try:
            return fn(doc)
        except LmlabError:
            raise
        except Exception as e:  # a template or field lookup failed on this document
            field_name = _missing_field(e)
            if field_name:
                raise LmlabError(f"{self.source or self.name}: {what} names field '{field_name}', "
                                 f"missing from {origin}") from None
            raise LmlabError(f"{self.source or self.name}: {what} failed on {origin} ({e})") from None

    def choices(self, doc: dict, origin: str) -> list[str]:
        choices = self._render(self.doc_to_choice, doc, origin, "doc_to_choice")
        if not isinstance(choices, list) or not choices:
            raise LmlabError(f"{self.source or self.name}: doc_to_choice gave {choices!r} for {origin} "
                             f"(expected a non-empty list)")
        return [str(c) for c in choices]

    def gold(self, doc: dict, origin: str, choices: list[str] | None) -> Any:
        target = self._render(self.doc_to_target, doc, origin, "doc_to_target")
        if self.output_type != "multiple_choice" or self.multiple_inputs:
            return target
        golds = target if isinstance(target, list) else [target]
        out = []
        for g in golds:
            if isinstance(g, str) and not g.strip().lstrip("-").isdigit():
                if g not in choices:
                    raise LmlabError(f"{self.source or self.name}: target {g!r} of {origin} is not one of "
                                     f"its choices {choices}")
                g = choices.index(g)
            g = int(g)
            if not 0 <= g < len(choices):
                raise LmlabError(f"{self.source or self.name}: label {g} of {origin} is out of range "
                                 f"for {len(choices)} choices")
            out.append(g)
        return out if isinstance(target, list) else out[0]

    def target_text(self, doc: dict, origin: str) -> str:
        """The answer as it appears in a few-shot example."""
        if self.multiple_inputs:
            return str(self._render(self.doc_to_target, doc, origin, "doc_to_target"))
        if self.output_type == "multiple_choice":
            choices = self.choices(doc, origin)
            g = self.gold(doc, origin, choices)
            return choices[g[0] if isinstance(g, list) else g]
        return str(self._render(self.doc_to_target, doc, origin, "doc_to_target"))

    def example_text(self, doc: dict, origin: str) -> str:
        if self.multiple_inputs:
            g = int(self._render(self.doc_to_text, doc, origin, "doc_to_text"))
            return self.choices(doc, origin)[g]
        return str(self._render(self.doc_to_text, doc, origin, "doc_to_text"))

    def fewshot_prefix(self, doc: dict, index: int, k: int, seed: int) -> str:
        pool = self.fewshot_docs if self.fewshot_docs is not None else self.docs
        if k > 0 and len(pool) == 0:
            raise LmlabError(f"{self.source or self.name}: {k}-shot needs examples, but the few-shot split is empty")
        shots = fewshot.choose(pool.docs, k, item=doc, item_index=index, seed=seed, sampler=self.fewshot_sampler)
        where = {id(d): o for d, o in zip(pool.docs, pool.origins)}
        parts = [self.example_text(s, where[id(s)]) + self.target_delimiter + self.target_text(s, where[id(s)])
                 for s in shots]
        return self.description + "".join(p + self.fewshot_delimiter for p in parts)

    # ------------------------------------------------------------------ requests
    def items(self, *, limit: int | None = None, num_fewshot: int | None = None, seed: int = 1234) -> list[Item]:
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        n = len(self.docs) if limit is None else min(limit, len(self.docs))
        return [self.item(i, k, seed) for i in range(n)]

    def item(self, i: int, k: int, seed: int) -> Item:
        doc, origin = self.docs.docs[i], self.docs.origins[i]
        if self.output_type == "loglikelihood_rolling":
            text = str(self._render(self.doc_to_target, doc, origin, "doc_to_target"))
            return Item(i, doc, [LoglikelihoodRolling(text)], target=text)
        prefix = self.fewshot_prefix(doc, i, k, seed)
        if self.multiple_inputs:
            contexts = self.choices(doc, origin)
            gold = int(self._render(self.doc_to_text, doc, origin, "doc_to_text"))
            if not 0 <= gold < len(contexts):
                raise LmlabError(f"{self.source or self.name}: label {gold} of {origin} is out of range "
                                 f"for {len(contexts)} choices")
            cont = self.target_delimiter + str(self._render(self.doc_to_target, doc, origin, "doc_to_target"))
            return Item(i, doc, [Loglikelihood(prefix + c, cont) for c in contexts], gold=gold, choices=contexts)
        context = prefix + str(self._render(self.doc_to_text, doc, origin, "doc_to_text"))
        if self.output_type == "multiple_choice":
            choices = self.choices(doc, origin)
            gold = self.gold(doc, origin, choices)
            return Item(i, doc, [Loglikelihood(context, self.target_delimiter + c) for c in choices],
                        gold=gold, choices=choices)
        target = str(self._render(self.doc_to_answer or self.doc_to_target, doc, origin, "doc_to_target"))
        if self.output_type == "loglikelihood":
            return Item(i, doc, [Loglikelihood(context, self.target_delimiter + target)], target=target)
        kw = dict(self.generation_kwargs)
        until = kw.pop("until", [self.fewshot_delimiter])
        until = (until,) if isinstance(until, str) else tuple(until)
        max_gen = int(kw.pop("max_gen_toks", 256))
        kw.pop("do_sample", None)
        return Item(i, doc, [GenerateUntil(context, until, max_gen, tuple(sorted(kw.items())))], target=target)

    # ------------------------------------------------------------------ scoring
    def score(self, item: Item, answers: list) -> dict[str, Any]:
        """Per-item metric values (corpus metrics as (loglikelihood, units) pairs)."""
        out: dict[str, Any] = {}
        if self.output_type == "multiple_choice":
            lls = [a.logprob for a in answers]
            golds = item.gold if isinstance(item.gold, list) else [item.gold]
            labels = [item.target or "" for _ in lls] if self.multiple_inputs else item.choices
            mc = metrics.score_multiple_choice(lls, labels, item.gold, [a.is_greedy for a in answers])
            mc["mc1"] = float(metrics.argmax(lls) == golds[0])
            mc["mc2"] = metrics.score_mc2(lls, golds)
            return {m: mc[m] for m in self.metrics}
        if self.output_type == "loglikelihood":
            a = answers[0]
            values = {"perplexity": (a.logprob, 1), "acc": float(a.is_greedy)}
            return {m: values[m] for m in self.metrics}
        if self.output_type == "loglikelihood_rolling":
            a = answers[0]
            text = item.target if self.count_text is None else self.count_text(item.doc)
            values = {"word_perplexity": (a.logprob, metrics.count_words(text)),
                      "byte_perplexity": (a.logprob, metrics.count_bytes(text)),
                      "bits_per_byte": (a.logprob, metrics.count_bytes(text)),
                      "perplexity": (a.logprob, a.n_tokens)}
            return {m: values[m] for m in self.metrics}
        text = answers[0]
        filters = self.filters or {"": lambda s: s}
        for fname, fn in filters.items():
            pred = fn(text)
            for m in self.metrics:
                key = f"{m},{fname}" if fname else m
                out[key] = metrics.score_exact_match(pred, item.target, **self.metric_options.get(m, {}))
        return out


def _missing_field(e: Exception) -> str | None:
    if isinstance(e, KeyError):
        return str(e.args[0]) if e.args else None
    msg = str(e)
    m = re.search(r"has no attribute '([^']+)'", msg) or re.search(r"'([^']+)' is undefined", msg)
    return m.group(1) if m else None


# ====================================================================== YAML tasks
YAML_KEYS = {
    "task", "dataset_path", "dataset_name", "data_files", "dataset_kwargs", "test_split", "validation_split",
    "training_split", "fewshot_split", "output_type", "doc_to_text", "doc_to_choice", "doc_to_target",
    "target_delimiter", "fewshot_delimiter", "num_fewshot", "generation_kwargs", "metric_list",
    "description", "fewshot_config", "filter_list", "tag", "group", "metadata", "should_decontaminate",
    "doc_to_decontamination_query", "repeats",
}
UNSUPPORTED_KEYS = {"process_docs", "process_results", "class", "include", "doc_to_image", "doc_to_audio",
                    "custom_dataset", "unsafe_code"}


def _jinja():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl: re.sub(pattern, repl, s)
    return env


def template(spec: Any, source: str, key: str, *, fields: set[str]) -> Callable[[dict], Any]:
    """A doc → value function from a YAML value: a field name, a Jinja2 template, a constant or a list."""
    if isinstance(spec, list):
        parts = [template(s, source, key, fields=fields) for s in spec]
        return lambda doc: [p(doc) for p in parts]
    if not isinstance(spec, str):
        return lambda doc: spec
    if spec in fields:
        return lambda doc: doc[spec]
    from jinja2 import TemplateSyntaxError

    try:
        compiled = _jinja().from_string(spec)
    except TemplateSyntaxError as e:
        raise LmlabError(f"{source}: {key} is not a valid Jinja2 template ({e.message})") from None

    def render(doc: dict) -> Any:
        text = compiled.render(**doc)
        if key == "doc_to_text":
            return text
        stripped = text.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                return ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                return text
        if key == "doc_to_target" and stripped.isdigit():
            return int(stripped)
        return text

    return render


def _files(spec: Any, yaml_path: Path, data_dir: Path | None) -> list[Path]:
    paths = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for p in paths:
        candidates = [Path(p)] if Path(p).is_absolute() else [
            *([data_dir / p] if data_dir else []), yaml_path.parent / p, Path(p)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise LmlabError(f"{yaml_path}: data file '{p}' not found (looked in "
                             f"{', '.join(str(c.parent) for c in candidates)})")
        out.append(found)
    return out


def _load_split(cfg: dict, split: str, yaml_path: Path, data_dir: Path | None) -> Docs:
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise LmlabError(f"{yaml_path}: dataset_kwargs must be a mapping")
    path, files = cfg.get("dataset_path"), cfg.get("data_files", kwargs.get("data_files"))
    kind = None
    if path in ("json", "csv"):
        kind = path
        if files is None:
            raise LmlabError(f"{yaml_path}: dataset_path '{path}' needs data_files")
        by_split = files if isinstance(files, dict) else {"train": files}
        if split not in by_split:
            raise LmlabError(f"{yaml_path}: split '{split}' is not in data_files (has {', '.join(by_split)})")
        paths = _files(by_split[split], yaml_path, data_dir)
    elif isinstance(path, str):
        folder = Path(path)
        if not folder.is_absolute():
            folder = next((c for c in [*([data_dir / path] if data_dir else []), yaml_path.parent / path, folder]
                           if c.is_dir()), folder)
        if not folder.is_dir():
            raise LmlabError(f"{yaml_path}: dataset_path '{path}' is not 'json', 'csv' or a local folder "
                             f"(datasets are read from local files only)")
        paths = sorted(p for ext in ("jsonl", "json", "csv") for p in folder.glob(f"{split}*.{ext}"))
        if not paths:
            raise LmlabError(f"{yaml_path}: no {split}.jsonl/.json/.csv in {folder}")
    else:
        raise LmlabError(f"{yaml_path}: missing dataset_path (json, csv or a local folder)")
    docs = Docs([], [])
    for p in paths:
        docs = docs + read_any(p, None if kind == "json" and p.suffix == ".jsonl" else kind)
    return docs


def _filters(spec: list, source: str) -> dict[str, Callable[[str], str]]:
    out = {}
    for f in spec:
        steps = []
        for step in f.get("filter", []):
            fn = step.get("function")
            if fn == "regex":
                pattern, group = step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), int(step.get("group_select", 0))
                fallback = step.get("fallback", "[invalid]")
                steps.append(lambda s, p=pattern, g=group, fb=fallback: metrics.extract_regex(s, p, g, fb))
            elif fn == "number":
                steps.append(lambda s: metrics.extract_number(s) or "[invalid]")
            elif fn == "lowercase":
                steps.append(str.lower)
            elif fn in ("take_first", "remove_whitespace", "strip"):
                steps.append(str.strip if fn != "take_first" else (lambda s: s))
            else:
                raise LmlabError(f"{source}: filter function '{fn}' is not supported "
                                 f"(supported: regex, number, lowercase, strip, take_first)")

        def run(s: str, steps=steps) -> str:
            for st in steps:
                s = st(s)
            return s

        out[str(f.get("name", f"filter{len(out)}"))] = run
    return out


def load_yaml(path: str | Path, data_dir: str | Path | None = None) -> Task:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"{path}: task file not found")
    text = path.read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if "!function" in line and not line.lstrip().startswith("#"):
            raise LmlabError(f"{path}:{n}: '!function' (a Python hook) is not supported; "
                             f"express the task with templates")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise LmlabError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(cfg, dict):
        raise LmlabError(f"{path}: a task file is a mapping of keys (task, dataset_path, doc_to_text, ...)")
    for key in cfg:
        if key in UNSUPPORTED_KEYS:
            raise LmlabError(f"{path}: key '{key}' (Python hooks and includes) is not supported; "
                             f"express the task with templates")
        if key not in YAML_KEYS:
            hint = difflib.get_close_matches(key, YAML_KEYS, n=1)
            raise LmlabError(f"{path}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    for key in ("task", "output_type", "doc_to_target"):
        if key not in cfg:
            raise LmlabError(f"{path}: missing required key '{key}'")
    data_dir = Path(data_dir) if data_dir else None
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise LmlabError(f"{path}: needs test_split or validation_split")
    docs = _load_split(cfg, split, path, data_dir)
    if not len(docs):
        raise LmlabError(f"{path}: split '{split}' has no documents")
    few_split = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    few = docs if few_split in (None, split) else _load_split(cfg, few_split, path, data_dir)
    fields = set(docs.docs[0])
    metric_names, options = [], {}
    for m in cfg.get("metric_list") or []:
        name = m.get("metric") if isinstance(m, dict) else m
        metric_names.append(name)
        if isinstance(m, dict):
            options[name] = {k: v for k, v in m.items() if k in ("ignore_case", "ignore_punctuation")}
    few_cfg = cfg.get("fewshot_config") or {}
    return Task(
        name=str(cfg["task"]), docs=docs, output_type=cfg["output_type"], source=str(path),
        doc_to_text=template(cfg.get("doc_to_text", ""), str(path), "doc_to_text", fields=fields),
        doc_to_target=template(cfg["doc_to_target"], str(path), "doc_to_target", fields=fields),
        doc_to_choice=(template(cfg["doc_to_choice"], str(path), "doc_to_choice", fields=fields)
                       if "doc_to_choice" in cfg else None),
        fewshot_docs=few, num_fewshot=int(cfg.get("num_fewshot") or 0),
        fewshot_sampler=few_cfg.get("sampler", "random"),
        target_delimiter=cfg.get("target_delimiter", " "), fewshot_delimiter=cfg.get("fewshot_delimiter", "\n\n"),
        description=cfg.get("description", ""), generation_kwargs=dict(cfg.get("generation_kwargs") or {}),
        metrics=metric_names, metric_options=options, filters=_filters(cfg.get("filter_list") or [], str(path)),
    )
