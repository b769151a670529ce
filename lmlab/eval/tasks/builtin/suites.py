"""Exam suites, one task per subject, 5-shot from dev (the first five, in file order):

- mmlu: <data-dir>/mmlu/{dev,val,test}/<subject>_<split>.csv, no header (question, A, B, C, D, answer);
  scored on test when present, else val.
- ceval: <data-dir>/ceval/{dev,val}/<subject>_<split>.csv with header id,question,A,B,C,D,answer[,explanation].
- cmmlu: <data-dir>/cmmlu/{dev,test}/<subject>.csv with header ,Question,A,B,C,D,Answer.

Chinese suites report acc_bytes too (length normalisation by UTF-8 bytes).
"""
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.eval.data import Docs, read_csv
from lmlab.eval.tasks.files import find
from lmlab.eval.tasks.task import Task

LETTERS = ["A", "B", "C", "D"]


def _gold(key: str):
    def get(doc):
        answer = doc[key].strip()
        if answer not in LETTERS:
            raise LmlabError(f"answer '{answer}' is not one of A, B, C, D")
        return LETTERS.index(answer)
    return get


def _suite(group: str, folder: Path, split: str, dev_split: str, *, header, question: str, answer: str,
           name_of, describe, answer_word: str, extra_metrics=()) -> list[Task]:
    files = sorted((folder / split).glob("*.csv"))
    if not files:
        raise LmlabError(f"task '{group}': no csv files in {folder / split}")
    tasks = []
    for f in files:
        subject = name_of(f.name)
        dev_file = next(iter(sorted((folder / dev_split).glob(f"{subject}*.csv"))), None)
        few = read_csv(dev_file, header) if dev_file else Docs([], [])
        text = (lambda q: lambda d: d[q].strip() + "".join(f"\n{L}. {d[L]}" for L in LETTERS) + f"\n{answer_word}")(question)
        tasks.append(Task(f"{group}_{subject}", read_csv(f, header), "multiple_choice", fewshot_docs=few,
                          num_fewshot=5, fewshot_sampler="first_n", description=describe(subject),
                          doc_to_text=text, doc_to_choice=lambda d: LETTERS, doc_to_target=_gold(answer),
                          metrics=["acc", "acc_norm", *extra_metrics], group=group, source=str(f)))
    return tasks


MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]


def mmlu(data_dir: Path) -> list[Task]:
    folder = find(data_dir, "mmlu", "mmlu", "data")
    split = "test" if (folder / "test").is_dir() else "val"
    return _suite("mmlu", folder, split, "dev", header=MMLU_COLUMNS, question="question", answer="answer",
                  name_of=lambda n: n.rsplit("_", 1)[0],
                  describe=lambda s: f"The following are multiple choice questions (with answers) about "
                                     f"{s.replace('_', ' ')}.\n\n", answer_word="Answer:")


def ceval(data_dir: Path) -> list[Task]:
    folder = find(data_dir, "ceval", "ceval", "ceval-exam")
    return _suite("ceval", folder, "val", "dev", header=True, question="question", answer="answer",
                  name_of=lambda n: n.rsplit("_", 1)[0],
                  describe=lambda s: f"以下是中国关于{s.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n",
                  answer_word="答案：", extra_metrics=["acc_bytes"])


def cmmlu(data_dir: Path) -> list[Task]:
    folder = find(data_dir, "cmmlu", "cmmlu")
    return _suite("cmmlu", folder, "test", "dev", header=True, question="Question", answer="Answer",
                  name_of=lambda n: n[:-4],
                  describe=lambda s: f"以下是关于{s.replace('_', ' ')}的单项选择题，请直接给出正确答案的选项。\n\n",
                  answer_word="答案：", extra_metrics=["acc_bytes"])
