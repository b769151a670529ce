"""LAMBADA (OpenAI's detokenized test set): <data-dir>/lambada_openai.jsonl ({text}); the target is the
last word. Metrics: perplexity of the last word and accuracy of greedily predicting it."""
from pathlib import Path

from lmlab.eval.data import read_jsonl
from lmlab.eval.tasks.files import find
from lmlab.eval.tasks.task import Task


def build(data_dir: Path) -> Task:
    path = find(data_dir, "lambada_openai", "lambada_openai.jsonl", "lambada_openai/lambada_test_en.jsonl")
    return Task("lambada_openai", read_jsonl(path), "loglikelihood", source=str(path), target_delimiter="",
                doc_to_text=lambda d: d["text"].rsplit(" ", 1)[0],
                doc_to_target=lambda d: " " + d["text"].rsplit(" ", 1)[1])
