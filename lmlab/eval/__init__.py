"""Base-model evaluation: tasks (YAML or built-in) → requests → one batched engine → metrics → report.

    from lmlab.eval import evaluate
    results = evaluate(model, tokenizer, ["piqa", "my_task.yaml"], data_dir="data/eval")
"""
from __future__ import annotations


def evaluate(model, tokenizer, tasks, **kwargs):
    """See lmlab.eval.evaluator.evaluate."""
    from lmlab.eval.evaluator import evaluate as run

    return run(model, tokenizer, tasks, **kwargs)


__all__ = ["evaluate"]
