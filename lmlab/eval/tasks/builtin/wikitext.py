"""WikiText (raw): <data-dir>/wikitext/wiki.test.raw, <data-dir>/wikitext-2-raw/wiki.test.raw or
<data-dir>/wikitext-2-raw-test.txt. Split into articles at top-level headings (' = Title = '), each
detokenized, and scored by rolling log-likelihood: word/byte perplexity and bits per byte. As in
lm-evaluation-harness, words and bytes are counted in the original (tokenized) text, so the numbers
compare with published ones."""
import re
from pathlib import Path

from lmlab.eval.data import Docs
from lmlab.eval.tasks.files import find
from lmlab.eval.tasks.task import Task

_HEADING = re.compile(r"^ ?= [^=].* = ?$")


def articles(text: str) -> list[str]:
    """Articles of a WikiText file: a new one starts at each top-level heading."""
    docs: list[list[str]] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            continue
        if _HEADING.match(line) or not docs:
            docs.append([])
        docs[-1].append(line)
    return ["\n".join(d) for d in docs]


_TOKENS = [  # WikiText's tokenisation, undone (in lm-evaluation-harness's order: the order matters)
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
    (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
]
_BRACKETS = [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
             (r"\"\s*([^\"]*?)\s*\"", r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'")]
_MISC = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)), (" \n", "\n"),
         ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def detokenize(text: str) -> str:
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for a, b in _TOKENS:
        text = text.replace(a, b)
    for pattern, repl in _BRACKETS:
        text = re.sub(pattern, repl, text)
    for a, b in _MISC:
        text = text.replace(a, b)
    return text


def build(data_dir: Path) -> Task:
    path = find(data_dir, "wikitext", "wikitext/wiki.test.raw", "wikitext-2-raw/wiki.test.raw",
                "wikitext-2-raw-test.txt")
    pages = articles(path.read_text(encoding="utf-8"))
    docs = Docs([{"page": p} for p in pages], [f"{path}:article {i + 1}" for i in range(len(pages))])
    return Task("wikitext", docs, "loglikelihood_rolling", source=str(path), doc_to_text=lambda d: "",
                doc_to_target=lambda d: detokenize(d["page"]), count_text=lambda d: d["page"])
