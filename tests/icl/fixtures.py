"""Small files in each built-in task's real public layout."""
import json
from pathlib import Path

SST2 = ["1 a gorgeous , witty , seductive movie .", "0 the story is bogus and its characters tissue-thin .",
        "1 an utterly charming and hilarious film .", "0 it 's a cookie-cutter movie , a cut-and-paste job .",
        "1 one of the greatest family films ever .", "0 dull , lifeless and amateurishly assembled ."]
TREC = ["NUM:dist How far is it from Denver to Aspen ?", "LOC:city What county is Modesto , California in ?",
        "HUM:desc Who was Galileo ?", "DESC:def What is an atom ?", "ENTY:animal What is the fastest fish ?",
        "ABBR:exp What does NASA stand for ?"]
AGNEWS = ['"3","Wall St. Bears Claw Back","Short-sellers, Wall Street\'s dwindling band, are seeing green again."',
          '"4","Space probe finds water","Scientists said the probe found ice (AP) on the moon."',
          '"2","Cubs win again","The Chicago Cubs beat the Reds 5-3 on Sunday."',
          '"1","Talks stall in Geneva","Diplomats said talks on the treaty stalled again."']
NLI = [{"premise": "The cat sat on the mat.", "hypothesis": "A cat is sitting.", "label": "entailment", "idx": 0},
       {"premise": "It rained all day.", "hypothesis": "The ground is dry.", "label": "not_entailment", "idx": 1}]
CB = [{"premise": "She said it was late.", "hypothesis": "it was late", "label": "entailment", "idx": 0},
      {"premise": "He never came back.", "hypothesis": "he came back", "label": "contradiction", "idx": 1},
      {"premise": "Maybe they left.", "hypothesis": "they left", "label": "neutral", "idx": 2}]


def write(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def data_dir(root: Path) -> Path:
    """Every built-in task's files under `root`, each in its public layout."""
    for split in ("train", "dev", "test"):
        write(root / "sst2" / f"stsa.binary.{split}", SST2)
    write(root / "trec" / "train.txt", TREC)
    (root / "trec" / "test.txt").write_bytes("\n".join(TREC[:3] + ["HUM:ind Who wrote Don Quixote , the caf\xe9 ?"])
                                              .encode("latin-1"))
    write(root / "agnews" / "train.csv", ['"Class Index","Title","Description"'] + AGNEWS)
    write(root / "agnews" / "test.csv", AGNEWS)
    for name in ("mr", "cr", "mpqa", "subj"):
        write(root / name / "train.txt", SST2)
        write(root / name / "test.txt", SST2[:4])
    for name, rows in (("RTE", NLI), ("CB", CB)):
        write(root / "superglue" / name / "train.jsonl", [json.dumps(r) for r in rows])
        write(root / "superglue" / name / "val.jsonl", [json.dumps(r) for r in rows])
    return root
