"""An in-context prompt: instruction, demonstrations rendered by a template, a separator, then the query.

A template is a Python format string over the document's fields and `{label}` (the verbalizer's word for
the label), e.g. "Review: {text}\nSentiment: {label}". Direct and generation scoring need `{label}` at the
end (the context is everything before it); channel scoring uses a channel template where `{label}` comes
before the input fields (the continuation is everything after it). When no channel template is given,
the template's line holding `{label}` is moved to the front.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from lmlab.errors import LmlabError

LABEL = "{label}"


def fields(template: str, what: str = "template") -> list[str]:
    """The placeholders of a format string, in order."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise LmlabError(f"{what} {template!r} is not a valid format string ({e})") from None


def channel_of(template: str) -> str:
    """The template with its `{label}` line moved first (what channel scoring conditions on); when that
    line shows an input field too, `{label}` alone goes first, on its own line."""
    lines = template.split("\n")
    at = next(i for i, line in enumerate(lines) if LABEL in line)
    if fields(lines[at]) == ["label"]:
        return "\n".join([lines[at], *lines[:at], *lines[at + 1:]])
    return LABEL + "\n" + template[:-len(LABEL)].rstrip()


@dataclass
class Prompt:
    template: str
    verbalizer: dict[str, str]
    instruction: str = ""
    separator: str = "\n\n"
    channel_template: str | None = None
    inputs: list[str] = field(default_factory=list)  # the document fields the template shows

    def __post_init__(self) -> None:
        names = fields(self.template)
        if names.count("label") != 1 or not self.template.endswith(LABEL):
            raise LmlabError(f"template {self.template!r} must end with {LABEL} (once)")
        self.inputs = [n for n in names if n != "label"]
        if not self.inputs:
            raise LmlabError(f"template {self.template!r} shows no input field (e.g. {{text}})")
        if self.channel_template is None:
            self.channel_template = channel_of(self.template)
        chan = fields(self.channel_template, "channel template")
        if chan.count("label") != 1 or sorted(n for n in chan if n != "label") != sorted(self.inputs) \
                or chan[0] != "label":
            raise LmlabError(f"channel template {self.channel_template!r} must show {LABEL} first, then the "
                             f"template's input fields {self.inputs}")

    # ------------------------------------------------------------------ checks
    def check_labels(self, labels: Sequence[str], where: str) -> None:
        """Every label has a non-blank word; no word names a label the task does not have."""
        for label in labels:
            if label not in self.verbalizer:
                raise LmlabError(f"{where}: the verbalizer has no word for label {label!r} "
                                 f"(it maps {sorted(self.verbalizer)})")
            if not str(self.verbalizer[label]).strip():
                raise LmlabError(f"{where}: the verbalizer's word for label {label!r} is blank")
        extra = sorted(set(self.verbalizer) - set(labels))
        if extra:
            raise LmlabError(f"{where}: the verbalizer maps {extra[0]!r}, which is not a label of this task "
                             f"({', '.join(labels)})")

    def check_tokens(self, encode, labels: Sequence[str]) -> None:
        """Every label word is at least one token for this tokenizer."""
        for label in labels:
            if not encode(" " + self.verbalizer[label].strip()) or not encode(self.verbalizer[label]):
                raise LmlabError(f"the verbalizer's word {self.verbalizer[label]!r} for label {label!r} "
                                 "tokenizes to nothing")

    # ------------------------------------------------------------------ rendering
    def _render(self, template: str, doc: dict[str, Any], word: str | None, origin: str) -> str:
        values = {k: doc[k] for k in self.inputs if k in doc}
        missing = [k for k in self.inputs if k not in doc]
        if missing:
            raise LmlabError(f"{origin}: the template shows {{{missing[0]}}}, which this document lacks "
                             f"(it has {', '.join(sorted(doc))})")
        return template.format_map({**values, "label": word if word is not None else LABEL})

    def demonstration(self, doc: dict[str, Any], origin: str = "", channel: bool = False) -> str:
        template = self.channel_template if channel else self.template
        return self._render(template, doc, self.verbalizer[doc["label"]], origin)

    def prefix(self, demos: Sequence[dict[str, Any]], origins: Sequence[str] = (), channel: bool = False) -> str:
        """Instruction and demonstrations, each followed by the separator: what precedes the query."""
        origins = list(origins) or [""] * len(demos)
        head = self.instruction + self.separator if self.instruction else ""
        return head + "".join(self.demonstration(d, o, channel) + self.separator for d, o in zip(demos, origins))

    def query(self, doc: dict[str, Any], origin: str = "") -> str:
        """The query's text up to where the label word would go (direct and generation context)."""
        text = self._render(self.template, doc, "\x00", origin)
        return text[:text.rindex("\x00")]

    def channel_parts(self, doc: dict[str, Any], label: str, origin: str = "") -> tuple[str, str]:
        """(the label's part, the input's part) of the query under the channel template."""
        text = self._render(self.channel_template, doc, "\x00", origin)
        at = text.index("\x00")
        word = self.verbalizer[label]
        return text[:at] + word, text[at + 1:]

    def content_free(self, doc: dict[str, Any], value: str) -> dict[str, Any]:
        """The document with every input field replaced by a content-free string."""
        return {**doc, **{k: value for k in self.inputs}}

    def with_overrides(self, **changes: Any) -> "Prompt":
        """A copy with the given (non-None) fields changed; a new template drops a derived channel one."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "template" in changes and "channel_template" not in changes:
            changes["channel_template"] = None
        return replace(self, **changes)


def parse_verbalizer(spec: str) -> dict[str, str]:
    """"negative=terrible,positive=great" → {"negative": "terrible", "positive": "great"}."""
    out: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise LmlabError(f"--verbalizer entry {part!r} is not LABEL=WORD")
        label, word = part.split("=", 1)
        if label.strip() in out:
            raise LmlabError(f"--verbalizer names label {label.strip()!r} twice")
        out[label.strip()] = word.strip()
    if not out:
        raise LmlabError("--verbalizer is empty (expected LABEL=WORD,LABEL=WORD)")
    return out


def unescape(text: str | None) -> str | None:
    """Command-line text with \\n and \\t written as escapes."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")
