"""Every built-in task on a tiny fixture written in its benchmark's public file layout: the requests
(contexts, continuations), the gold answers, and the scores from given model answers."""
import json
import math

import pytest

from lmlab.errors import LmlabError
from lmlab.eval.requests import LoglikelihoodResult as LL
from lmlab.eval.tasks.builtin import build, names


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _csv(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _one(name, data_dir, **kw):
    tasks = build(name, data_dir)
    assert len(tasks) == 1
    return tasks[0], tasks[0].items(**kw)


def _score(task, item, answers):
    item.answers = {"main": answers}
    return task.score(item)


def _lls(*values, greedy=None):
    return [LL(v, i == greedy) for i, v in enumerate(values)]


def _pairs(item):
    return [(r.context, r.continuation) for r in item.requests["main"]]


def test_registry_lists_every_builtin_and_suggests_on_a_typo(tmp_path):
    assert names() == sorted(["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "boolq_closed",
                              "copa", "rte", "cb", "mmlu", "ceval", "cmmlu", "lambada_openai", "wikitext", "gsm8k",
                              "truthfulqa_mc1", "truthfulqa_mc2"])
    with pytest.raises(LmlabError, match=r"unknown task 'hellaswg' \(did you mean 'hellaswag'\?\)"):
        build("hellaswg", tmp_path)
    with pytest.raises(LmlabError, match=r"task 'piqa': expected .*/piqa/valid.jsonl or .*/valid.jsonl"):
        build("piqa", tmp_path)


def test_piqa(tmp_path):
    _jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
                                           {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel"}])
    (tmp_path / "piqa/valid-labels.lst").write_text("0\n1\n")
    task, items = _one("piqa", tmp_path)
    assert _pairs(items[0]) == [("Question: Open a jar\nAnswer:", " twist the lid"),
                                ("Question: Open a jar\nAnswer:", " eat the lid")]
    assert [it.gold for it in items] == [0, 1]
    assert _score(task, items[1], _lls(-1.0, -2.0)) == {"acc": 0.0, "acc_norm": 0.0}
    (tmp_path / "piqa/valid-labels.lst").write_text("0\n2\n")
    with pytest.raises(LmlabError, match=r"valid-labels.lst:2: label '2' is not 0 or 1"):
        build("piqa", tmp_path)


def test_hellaswag_cleans_artifacts_and_normalises_by_length(tmp_path):
    _jsonl(tmp_path / "hellaswag/hellaswag_val.jsonl", [{
        "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing [title] on a roof."]}])
    task, items = _one("hellaswag", tmp_path)
    (ctx, first), *_ = _pairs(items[0])
    assert ctx == "Roof shingle removal: A man is sitting on a roof. He"
    assert [c for _, c in _pairs(items[0])] == [" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                                                " is holding a rubik's cube.", " starts pulling up roofing. on a roof."]
    assert items[0].gold == 3
    # the longest ending has the lowest total log-likelihood but the best per character: acc 0, acc_norm 1
    n = [len(c) for _, c in _pairs(items[0])]
    lls = _lls(-1.0 * n[0], -1.0 * n[1], -1.0 * n[2], -0.9 * n[3])
    assert _score(task, items[0], lls) == {"acc": 0.0, "acc_norm": 1.0}


def test_winogrande_scores_the_shared_rest_given_each_option(tmp_path):
    _jsonl(tmp_path / "winogrande/dev.jsonl", [
        {"sentence": "The trophy doesn't fit into the suitcase because _ is too large.", "option1": "the trophy",
         "option2": "the suitcase", "answer": "1"},
        {"sentence": "Sarah lent Maria money since _ was broke.", "option1": "Sarah", "option2": "Maria",
         "answer": "2"}])
    task, items = _one("winogrande", tmp_path)
    assert _pairs(items[0]) == [("The trophy doesn't fit into the suitcase because the trophy", " is too large."),
                                ("The trophy doesn't fit into the suitcase because the suitcase", " is too large.")]
    assert [it.gold for it in items] == [0, 1]
    assert _score(task, items[1], _lls(-3.0, -2.0)) == {"acc": 1.0, "acc_norm": 1.0}
    assert _score(task, items[0], _lls(-3.0, -2.0)) == {"acc": 0.0, "acc_norm": 0.0}
    one_shot = task.items(num_fewshot=1)[0].requests["main"][0].context
    assert one_shot == "Sarah lent Maria money since Maria was broke.\n\nThe trophy doesn't fit into the suitcase because the trophy"


def test_lambada_scores_the_last_word(tmp_path):
    _jsonl(tmp_path / "lambada_openai.jsonl", [{"text": "she poured the tea and handed him the cup"}])
    task, items = _one("lambada_openai", tmp_path)
    assert _pairs(items[0]) == [("she poured the tea and handed him the", " cup")]
    assert _score(task, items[0], [LL(-2.5, True)]) == {"perplexity": (-2.5, 1), "acc": 1.0}
    assert _score(task, items[0], [LL(-2.5, False)])["acc"] == 0.0


def _arc(stem, labels, texts, key):
    return {"id": stem[:4], "question": {"stem": stem, "choices": [{"text": t, "label": lab}
                                                                   for t, lab in zip(texts, labels)]},
            "answerKey": key}


@pytest.mark.parametrize("name,folder,prefix", [("arc_easy", "ARC-Easy", ""),
                                                ("arc_challenge", "ARC-Challenge", "ARC-V1-Feb2018-2/")])
def test_arc(tmp_path, name, folder, prefix):
    _jsonl(tmp_path / f"{prefix}{folder}/{folder}-Test.jsonl", [
        _arc("Which is a gas?", "ABCD", ["ice", "steam", "wood", "iron"], "B"),
        _arc("How many legs has a spider?", "1234", ["six", "eight", "ten"], "2")])
    task, items = _one(name, tmp_path)
    assert task.name == name
    assert _pairs(items[0])[1] == ("Question: Which is a gas?\nAnswer:", " steam")
    assert items[0].choices == ["ice", "steam", "wood", "iron"] and items[0].gold == 1
    assert items[1].choices == ["six", "eight", "ten"] and items[1].gold == 1  # numeric labels
    assert _score(task, items[1], _lls(-4.0, -1.0, -2.0)) == {"acc": 1.0, "acc_norm": 1.0}


def test_arc_answer_key_not_among_labels_is_an_error(tmp_path):
    _jsonl(tmp_path / "ARC-Easy/ARC-Easy-Test.jsonl", [_arc("Which?", "AB", ["x", "y"], "E")])
    with pytest.raises(LmlabError, match=r"label -1 of .*ARC-Easy-Test.jsonl:1 is out of range for 2 choices"):
        _one("arc_easy", tmp_path)


def _superglue(tmp_path, folder, val, train=None):
    _jsonl(tmp_path / f"superglue/{folder}/val.jsonl", val)
    if train:
        _jsonl(tmp_path / f"superglue/{folder}/train.jsonl", train)


def test_rte(tmp_path):
    _superglue(tmp_path, "RTE", [{"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": "entailment", "idx": 0},
                                 {"premise": "It rained.", "hypothesis": "It was dry.", "label": "not_entailment",
                                  "idx": 1}],
               train=[{"premise": "Dogs bark.", "hypothesis": "Dogs are silent.", "label": "not_entailment", "idx": 0}])
    task, items = _one("rte", tmp_path)
    assert _pairs(items[0]) == [("A cat sat.\nQuestion: An animal sat. True or False?\nAnswer:", " True"),
                                ("A cat sat.\nQuestion: An animal sat. True or False?\nAnswer:", " False")]
    assert [it.gold for it in items] == [0, 1]
    assert _score(task, items[1], _lls(-0.5, -0.7)) == {"acc": 0.0, "acc_norm": 0.0}
    shot = task.items(num_fewshot=1)[0].requests["main"][0].context  # the example comes from train.jsonl
    assert shot.startswith("Dogs bark.\nQuestion: Dogs are silent. True or False?\nAnswer: False\n\nA cat sat.")


def test_cb(tmp_path):
    _superglue(tmp_path, "CB", [
        {"premise": "He left.", "hypothesis": "he is gone", "label": "entailment", "idx": 0},
        {"premise": "He stayed.", "hypothesis": "he is gone", "label": "contradiction", "idx": 1},
        {"premise": "He may go.", "hypothesis": "he is gone", "label": "neutral", "idx": 2}])
    task, items = _one("cb", tmp_path)
    ctx = "He stayed.\nQuestion: he is gone. True, False, or Neither?\nAnswer:"
    assert _pairs(items[1]) == [(ctx, " True"), (ctx, " False"), (ctx, " Neither")]
    assert [it.gold for it in items] == [0, 1, 2]
    assert _score(task, items[2], _lls(-3.0, -2.0, -1.0))["acc"] == 1.0
    _superglue(tmp_path, "CB", [{"premise": "x", "hypothesis": "y", "label": "maybe", "idx": 0}])
    with pytest.raises(LmlabError, match=r"label 'maybe' is not one of"):
        _one("cb", tmp_path)


def test_boolq_and_copa(tmp_path):
    _superglue(tmp_path, "BoolQ", [{"passage": "Water boils at 100 C.", "question": "does water boil at 100 c",
                                    "label": True, "idx": 0}])
    task, items = _one("boolq", tmp_path)
    ctx = "Water boils at 100 C.\nQuestion: does water boil at 100 c?\nAnswer:"
    assert _pairs(items[0]) == [(ctx, " no"), (ctx, " yes")] and items[0].gold == 1
    task, items = _one("boolq_closed", tmp_path)  # without the passage; retrieval queries by the question
    assert _pairs(items[0]) == [(ctx.split("\n", 1)[1], " no"), (ctx.split("\n", 1)[1], " yes")]
    assert items[0].gold == 1 and task.doc_to_query(items[0].doc) == "does water boil at 100 c"
    _superglue(tmp_path, "COPA", [{"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
                                   "choice2": "He got a hole in his sock.", "question": "cause", "label": 0, "idx": 0}])
    task, items = _one("copa", tmp_path)
    assert _pairs(items[0]) == [("The man broke his toe because", " he dropped a hammer on his foot."),
                                ("The man broke his toe because", " he got a hole in his sock.")]
    assert _score(task, items[0], _lls(-2.0, -3.0)) == {"acc": 1.0, "acc_norm": 1.0}


def _exam_rows(n, lead):
    return [(f"{lead} question {i}?", f"a{i}", f"b{i}", f"c{i}", f"d{i}", "ABCD"[i % 4]) for i in range(n)]


def test_mmlu_five_shot_from_dev_in_file_order(tmp_path):
    _csv(tmp_path / "mmlu/dev/high_school_physics_dev.csv", [",".join(r) for r in _exam_rows(6, "dev")])
    _csv(tmp_path / "mmlu/val/high_school_physics_val.csv", [",".join(r) for r in _exam_rows(2, "val")])
    _csv(tmp_path / "mmlu/val/anatomy_val.csv", [",".join(r) for r in _exam_rows(1, "ana")])
    tasks = build("mmlu", tmp_path)
    assert [t.name for t in tasks] == ["mmlu_anatomy", "mmlu_high_school_physics"]
    assert all(t.group == "mmlu" for t in tasks)
    task = tasks[1]
    item = task.items()[1]
    ctx = item.requests["main"][0].context
    shots = "".join(f"dev question {i}?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n"
                    for i in range(5))
    assert ctx == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                   + shots + "val question 1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:")
    assert [c for _, c in _pairs(item)] == [" A", " B", " C", " D"] and item.gold == 1
    assert _score(task, item, _lls(-3.0, -1.0, -2.0, -4.0)) == {"acc": 1.0, "acc_norm": 1.0}
    with pytest.raises(LmlabError, match=r"anatomy_val.csv: 5-shot needs examples, but the few-shot split is empty"):
        tasks[0].items()  # no anatomy dev file
    assert tasks[0].items(num_fewshot=0)[0].requests["main"][0].context.count("Answer:") == 1


def test_ceval(tmp_path):
    _csv(tmp_path / "ceval/dev/law_dev.csv", ["id,question,A,B,C,D,answer,explanation",
                                              "0,开发问题____。,甲,乙,丙,丁,C,因为"])
    _csv(tmp_path / "ceval/val/law_val.csv", ["id,question,A,B,C,D,answer", "0,验证问题____。,一,二,三,四,B"])
    task, items = _one("ceval", tmp_path)
    assert task.name == "ceval_law" and task.metrics == ["acc", "acc_norm", "acc_bytes"]
    assert items[0].requests["main"][0].context == (
        "以下是中国关于law考试的单项选择题，请选出其中的正确答案。\n\n"
        "开发问题____。\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： C\n\n验证问题____。\nA. 一\nB. 二\nC. 三\nD. 四\n答案：")
    assert items[0].gold == 1
    assert _score(task, items[0], _lls(-2.0, -1.0, -3.0, -4.0)) == {"acc": 1.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    _csv(tmp_path / "ceval/val/law_val.csv", ["id,question,A,B,C,D,answer", "0,q,1,2,3,4,E"])
    with pytest.raises(LmlabError, match="answer 'E' is not one of A, B, C, D"):
        _one("ceval", tmp_path)


def test_cmmlu(tmp_path):
    _csv(tmp_path / "cmmlu/dev/agronomy.csv", [",Question,A,B,C,D,Answer", "0,示例问题,甲,乙,丙,丁,D"])
    _csv(tmp_path / "cmmlu/test/agronomy.csv", [",Question,A,B,C,D,Answer", "0,测试问题,一,二,三,四,A",
                                               "1,第二个问题,五,六,七,八,C"])
    task, items = _one("cmmlu", tmp_path)
    assert task.name == "cmmlu_agronomy" and len(items) == 2
    assert items[1].requests["main"][0].context == (
        "以下是关于agronomy的单项选择题，请直接给出正确答案的选项。\n\n"
        "示例问题\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： D\n\n第二个问题\nA. 五\nB. 六\nC. 七\nD. 八\n答案：")
    assert [it.gold for it in items] == [0, 2]
    assert _score(task, items[1], _lls(-2.0, -1.0, -3.0, -4.0))["acc_bytes"] == 0.0


def test_gsm8k_shows_reasoning_and_scores_the_number(tmp_path):
    train = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(6)]
    _jsonl(tmp_path / "gsm8k/train.jsonl", train)
    _jsonl(tmp_path / "gsm8k/test.jsonl", [{"question": "Tom has 3 apples and buys 4. How many?",
                                            "answer": "3 + 4 = 7\n#### 7"}])
    task, items = _one("gsm8k", tmp_path)
    req = items[0].requests["main"][0]
    assert req.context.count("Question: ") == 6  # five examples + the item
    assert req.context.endswith("\n\nQuestion: Tom has 3 apples and buys 4. How many?\nAnswer:")
    assert "Answer: 1 + 1 = 2\n#### 2" in req.context or "Answer: 0 + 0 = 0\n#### 0" in req.context
    assert req.until == ("Question:", "</s>", "<|im_end|>") and req.max_gen_toks == 256
    assert items[0].target == "7"
    assert _score(task, items[0], [" 3 + 4 = 7\n#### 7"]) == {"exact_match,strict-match": 1.0,
                                                             "exact_match,flexible-extract": 1.0}
    assert _score(task, items[0], [" She has 7 apples."]) == {"exact_match,strict-match": 0.0,
                                                              "exact_match,flexible-extract": 1.0}
    assert _score(task, items[0], [" #### 8, or 9"]) == {"exact_match,strict-match": 0.0,
                                                         "exact_match,flexible-extract": 0.0}


def test_truthfulqa_mc1_and_mc2(tmp_path):
    from lmlab.eval.tasks.builtin.generative import PRIMER

    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa/mc_task.json").write_text(json.dumps([{
        "question": "What happens if you crack your knuckles?",
        "mc1_targets": {"Nothing in particular.": 1, "You get arthritis.": 0},
        "mc2_targets": {"Nothing in particular.": 1, "You get arthritis.": 0, "Nothing harmful.": 1}}]))
    mc1, items1 = _one("truthfulqa_mc1", tmp_path)
    mc2, items2 = _one("truthfulqa_mc2", tmp_path)
    ctx = PRIMER + "Q: What happens if you crack your knuckles?\nA:"
    assert _pairs(items1[0]) == [(ctx, " Nothing in particular."), (ctx, " You get arthritis.")]
    assert items1[0].gold == [0] and items2[0].gold == [0, 2]
    assert _score(mc1, items1[0], _lls(-2.0, -1.0)) == {"mc1": 0.0}
    lls = [-1.0, -2.0, -3.0]
    want = (math.exp(-1) + math.exp(-3)) / sum(math.exp(x) for x in lls)
    assert _score(mc2, items2[0], _lls(*lls)) == {"mc2": pytest.approx(want)}


def test_wikitext_layouts(tmp_path):
    (tmp_path / "wikitext").mkdir()
    (tmp_path / "wikitext/wiki.test.raw").write_text(" = A = \n one @,@ two \n = B = \n three \n")
    task, items = _one("wikitext", tmp_path)
    assert [it.requests["main"][0].text for it in items] == [" = A =\none,two ", " = B =\nthree "]
