"""A fine-tuned classifier scored on an in-context learning task's test items, like for like with `lmlab icl`.

The items, their order, their gold labels and the accuracy are those `lmlab icl` reports: the task is read
by lmlab.icl.tasks.load_task (the same files, split and label names), the text is the task's input
(ICLTask.input_text: what its template shows), the first `limit` items are scored, and accuracy is the
mean of prediction == gold, as in lmlab.icl.experiment.Grid.score. Only the predictor differs: the
classifier's head instead of the label words' log-likelihoods.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lmlab.errors import LmlabError
from lmlab.finetune.labeled import pad_batch


def icl_task_accuracy(model, tok, task: str, data_dir: str | Path | None = None, split: str | None = None,
                      limit: int = 0, labels: list[str] | None = None, batch_size: int = 32,
                      max_len: int = 512) -> dict:
    """{"task", "split", "n", "acc", "predictions", "items"} of a SequenceClassifier on the task's test items
    (items: each one's origin "file:line", gold label and predicted label, the keys `lmlab icl` logs).
    labels: the classifier's label for each of the task's labels, in the task's order (default: the
    classifier's labels in their own order, when there are as many)."""
    from lmlab.icl.tasks import load_task

    t = load_task(task, data_dir, split or None)
    mine = list(labels) if labels else list(model.labels)
    if len(mine) != len(t.labels) or any(lab not in model.labels for lab in mine):
        raise LmlabError(f"eval_icl.labels: the classifier's labels {model.labels} cannot stand for task {task}'s "
                         f"labels {t.labels} (give one classifier label per task label, in the task's order)")
    to_task = {model.labels.index(lab): i for i, lab in enumerate(mine)}
    docs, origins = t.test.docs[:limit or None], t.test.origins[:limit or None]
    gold = [t.labels.index(d["label"]) for d in docs]
    preds: list[int] = []
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for i in range(0, len(docs), batch_size):
            ids = [x[:max_len] for x in tok.encode_batch([t.input_text(d) for d in docs[i:i + batch_size]])]
            input_ids, mask = pad_batch(ids, tok.pad_id)
            logits = model(input_ids.to(device), attention_mask=mask.to(device))
            preds += [to_task[j] for j in logits.argmax(-1).tolist()]
    correct = [p == g for p, g in zip(preds, gold)]
    return {"task": t.name, "split": split or "default", "source": t.source, "n": len(docs),
            "acc": sum(correct) / len(docs),
            "predictions": {lab: sum(p == k for p in preds) for k, lab in enumerate(t.labels)},
            "items": [{"origin": o, "label": t.labels[g], "prediction": t.labels[p]}
                      for o, g, p in zip(origins, gold, preds)]}
