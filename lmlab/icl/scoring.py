"""How an in-context item is scored, as requests for the evaluation engine (the code `lmlab eval` runs):

- direct:   log P(label word | prompt) for each label; the prediction is the most likely label.
- channel:  log P(input | prompt up to the label word) for each label (Min et al. 2022, "Noisy Channel
            Language Model Prompting"); the demonstrations are shown label first too.
- generate: greedy generation after the prompt, parsed back to a label by the verbalizer's words.

With calibration (direct scoring), each item also asks a named request group, "content_free": the same
prompt with every input field replaced by each content-free input ("N/A", "", "[MASK]"), whose mean label
probabilities calibrate the item (lmlab.icl.calibration).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lmlab.errors import LmlabError
from lmlab.eval.requests import MAIN, GenerateUntil, Item, Loglikelihood
from lmlab.icl.calibration import CONTENT_FREE_INPUTS, probs_from_logliks
from lmlab.icl.prompt import Prompt

SCORINGS = ("direct", "channel", "generate")
CONTENT_FREE = "content_free"


def check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        from lmlab.utils.suggest import unknown

        raise LmlabError(unknown("scoring", scoring, SCORINGS))


def requests(prompt: Prompt, labels: Sequence[str], prefix: str, doc: dict, origin: str, scoring: str,
             max_gen_toks: int = 8) -> list:
    """One document's requests under `scoring`, after `prefix` (instruction and demonstrations)."""
    if scoring == "direct":
        context = prefix + prompt.query(doc, origin)
        return [Loglikelihood(context, prompt.verbalizer[label]) for label in labels]
    if scoring == "channel":
        out = []
        for label in labels:
            head, tail = prompt.channel_parts(doc, label, origin)
            out.append(Loglikelihood(prefix + head, tail))
        return out
    if scoring == "generate":
        stop = tuple(dict.fromkeys(s for s in ("\n", prompt.separator) if s))
        return [GenerateUntil((prefix + prompt.query(doc, origin)).rstrip(" "), stop, max_gen_toks)]
    check_scoring(scoring)
    return []


def build_item(index: int, doc: dict, origin: str, prompt: Prompt, labels: Sequence[str], prefix: str,
               scoring: str, calibrate: bool, max_gen_toks: int = 8) -> Item:
    """An eval Item with the main requests and, for calibrated direct scoring, the content-free group."""
    item = Item(index, doc, origin, prefix=prefix, gold=labels.index(doc["label"]),
                choices=[prompt.verbalizer[l] for l in labels])
    item.requests[MAIN] = requests(prompt, labels, prefix, doc, origin, scoring, max_gen_toks)
    if calibrate and scoring == "direct":
        item.requests[CONTENT_FREE] = [r for cf in CONTENT_FREE_INPUTS
                                       for r in requests(prompt, labels, prefix, prompt.content_free(doc, cf),
                                                         origin, scoring)]
    return item


def label_probs(item: Item) -> np.ndarray:
    """The item's probabilities over its labels (softmax of the labels' log-likelihoods)."""
    return probs_from_logliks([a.logprob for a in item.answers[MAIN]])[0]


def content_free_probs(item: Item, n_labels: int) -> np.ndarray:
    """Rows: content-free inputs; columns: label probabilities."""
    lls = np.array([a.logprob for a in item.answers[CONTENT_FREE]], dtype=np.float64)
    return probs_from_logliks(lls.reshape(-1, n_labels))


def parse_generation(text: str, prompt: Prompt, labels: Sequence[str]) -> int | None:
    """The label whose word the generated text starts with (case-insensitive; the longest word wins when
    one word is a prefix of another), or None when it names none."""
    said = text.strip().lower()
    best = None
    for i, label in enumerate(labels):
        word = prompt.verbalizer[label].strip().lower()
        if said.startswith(word) and (best is None or len(word) > len(prompt.verbalizer[labels[best]].strip())):
            rest = said[len(word):]
            if not rest or not rest[0].isalnum():
                best = i
    return best
