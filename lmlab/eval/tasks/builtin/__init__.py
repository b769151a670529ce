"""Built-in tasks, each reading its benchmark's own published file layout from --data-dir.

`build(name, data_dir)` returns the task's Tasks (a suite such as mmlu gives one per subject). The
expected files of every task are listed in the README (Evaluation, built-in tasks) and in each
module's docstring.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from lmlab.errors import LmlabError
from lmlab.utils.suggest import did_you_mean


def _registry() -> dict[str, Callable]:
    from lmlab.eval.tasks.builtin import (arc, generative, hellaswag, lambada, piqa, suites, superglue, wikitext,
                                          winogrande)

    return {
        "piqa": piqa.build, "hellaswag": hellaswag.build, "winogrande": winogrande.build,
        "arc_easy": arc.build_easy, "arc_challenge": arc.build_challenge,
        "boolq": superglue.boolq, "boolq_closed": superglue.boolq_closed, "copa": superglue.copa,
        "rte": superglue.rte, "cb": superglue.cb,
        "mmlu": suites.mmlu, "ceval": suites.ceval, "cmmlu": suites.cmmlu,
        "lambada_openai": lambada.build, "wikitext": wikitext.build,
        "gsm8k": generative.gsm8k, "truthfulqa_mc1": generative.truthfulqa_mc1,
        "truthfulqa_mc2": generative.truthfulqa_mc2,
    }


def names() -> list[str]:
    return sorted(_registry())


def build(name: str, data_dir: str | Path | None) -> list:
    registry = _registry()
    if name not in registry:
        raise LmlabError(f"unknown task '{name}'" + did_you_mean(name, registry)
                         + f"; built-in tasks: {', '.join(sorted(registry))}, or a path to a task .yaml")
    if data_dir is None:
        raise LmlabError(f"task '{name}' reads its files from --data-dir; none given")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LmlabError(f"--data-dir {data_dir}: not a folder")
    out = registry[name](data_dir)
    return out if isinstance(out, list) else [out]
