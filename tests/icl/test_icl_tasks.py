"""Built-in tasks read their public layouts; a YAML task reads "label<TAB>text" lines; bad input is named."""
import pytest

from fixtures import data_dir, write
from lmlab.errors import LmlabError
from lmlab.icl.tasks import BUILTIN, load_task


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return data_dir(tmp_path_factory.mktemp("icl_data"))


EXPECT = {  # task → (pool size, test size, labels, first test document's label, a field of it)
    "sst2": (6, 6, ["negative", "positive"], "positive", ("text", "a gorgeous , witty , seductive movie .")),
    "trec": (6, 4, ["Abbreviation", "Description", "Entity", "Person", "Location", "Number"], "Number",
             ("text", "How far is it from Denver to Aspen ?")),
    "agnews": (4, 4, ["World", "Sports", "Business", "Sci/Tech"], "Business",
               ("text", "Wall St. Bears Claw Back Short-sellers, Wall Street's dwindling band, are seeing green again.")),
    "mr": (6, 4, ["negative", "positive"], "positive", ("text", "a gorgeous , witty , seductive movie .")),
    "cr": (6, 4, ["negative", "positive"], "positive", ("text", "a gorgeous , witty , seductive movie .")),
    "mpqa": (6, 4, ["negative", "positive"], "positive", ("text", "a gorgeous , witty , seductive movie .")),
    "subj": (6, 4, ["subjective", "objective"], "objective", ("text", "a gorgeous , witty , seductive movie .")),
    "rte": (2, 2, ["entailment", "not_entailment"], "entailment", ("premise", "The cat sat on the mat.")),
    "cb": (3, 3, ["entailment", "contradiction", "neutral"], "entailment", ("hypothesis", "it was late")),
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_each_builtin_task_reads_its_public_layout(root, name):
    task = load_task(name, root)
    pool, test, labels, first, (key, value) = EXPECT[name]
    assert (len(task.pool), len(task.test), task.labels) == (pool, test, labels)
    assert task.test.docs[0]["label"] == first and task.test.docs[0][key] == value
    assert task.test.origins[0].endswith(":1") or name == "agnews"
    assert set(task.prompt.verbalizer) == set(labels)
    # the default prompt renders every document
    assert all(task.prompt.query(d).endswith(": ") for d in task.test.docs)


def test_trec_latin1_and_fine_labels(root):
    task = load_task("trec", root)
    assert task.test.docs[3] == {"label": "Person", "fine": "ind", "text": "Who wrote Don Quixote , the café ?"}


def test_agnews_skips_only_a_header(root):
    assert load_task("agnews", root).pool.origins[0].endswith("train.csv:2")
    assert load_task("agnews", root).test.origins[0].endswith("test.csv:1")


def test_a_line_off_the_layout_names_file_and_line(tmp_path):
    write(tmp_path / "sst2" / "stsa.binary.train", ["1 fine .", "positive great movie"])
    write(tmp_path / "sst2" / "stsa.binary.dev", ["1 fine ."])
    with pytest.raises(LmlabError, match=r"stsa\.binary\.train:2: label 'positive' is not one of"):
        load_task("sst2", tmp_path)
    write(tmp_path / "trec" / "train.txt", ["NUM:dist How far ?", "How far is it ?"])
    write(tmp_path / "trec" / "test.txt", ["NUM:dist How far ?"])
    with pytest.raises(LmlabError, match=r"train\.txt:2: line does not match the 'COARSE:fine question' layout"):
        load_task("trec", tmp_path)
    write(tmp_path / "agnews" / "train.csv", ['"5","x","y"'])
    write(tmp_path / "agnews" / "test.csv", ['"1","x","y"'])
    with pytest.raises(LmlabError, match=r"train\.csv:1: expected 'class index \(1-4\),title,description'"):
        load_task("agnews", tmp_path)


def test_missing_files_and_unknown_tasks(tmp_path):
    with pytest.raises(LmlabError, match="expected .*sst2"):
        load_task("sst2", tmp_path)
    with pytest.raises(LmlabError, match="did you mean 'sst2'"):
        load_task("sst", tmp_path)


YAML = """task: mine
dataset_path: text
data_files: {{train: pool.tsv, test: test.tsv}}
line_pattern: '(?P<label>[^\\t]+)\\t(?P<text>.*)'
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: '{{{{text}}}}'
doc_to_choice: {choices}
doc_to_target: label
target_delimiter: ' => '
"""


def test_a_yaml_task_reads_label_tab_text_lines(tmp_path):
    write(tmp_path / "pool.tsv", ["spam\tbuy now", "ham\tsee you at lunch", "spam\tfree money"])
    write(tmp_path / "test.tsv", ["ham\tmeeting at noon", "spam\tcheap pills"])
    (tmp_path / "mine.yaml").write_text(YAML.format(choices="['ham', 'spam']"))
    task = load_task(str(tmp_path / "mine.yaml"))
    assert task.labels == ["ham", "spam"] and len(task.pool) == 3
    assert task.test.docs[1] == {"text": "cheap pills", "label": "spam"}
    assert task.prompt.prefix([task.pool.docs[0]]) + task.prompt.query(task.test.docs[0]) == \
        "buy now => spam\n\nmeeting at noon => "
    write(tmp_path / "test.tsv", ["ham\tmeeting at noon", "spam cheap pills"])
    with pytest.raises(LmlabError, match=r"test\.tsv:2: line does not match line_pattern"):
        load_task(str(tmp_path / "mine.yaml"))


def test_a_yaml_text_task_needs_a_pattern(tmp_path):
    (tmp_path / "t.yaml").write_text(YAML.replace("line_pattern", "# no").format(choices="['a', 'b']"))
    write(tmp_path / "pool.tsv", ["a\tx"])
    with pytest.raises(LmlabError, match="needs line_pattern"):
        load_task(str(tmp_path / "t.yaml"))


BAD_LINES = {  # task → (file to break, a line off its layout, the error after "<file>:<line>: ")
    "mr": ("mr/test.txt", "1", "line does not match the '<label> <sentence>' layout"),
    "cr": ("cr/train.txt", "2 a fine phone .", "label '2' is not one of"),
    "subj": ("subj/test.txt", "objective the plot moves .", "label 'objective' is not one of"),
    "mpqa": ("mpqa/train.txt", "0", "line does not match the '<label> <sentence>' layout"),
    "sst2": ("sst2/stsa.binary.dev", "1", "line does not match the '<label> <sentence>' layout"),
    "trec": ("trec/test.txt", "num:dist How far ?", "line does not match the 'COARSE:fine question' layout"),
    "agnews": ("agnews/test.csv", '"2","only a title"', "expected 'class index (1-4),title,description'"),
    "rte": ("superglue/RTE/val.jsonl", '{"premise": "a", "hypothesis": "b"', "not valid JSON"),
    "cb": ("superglue/CB/train.jsonl", '{"premise": "a", "label": "neutral", "idx": 9}', "missing field 'hypothesis'"),
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_task_names_the_file_and_line_off_its_layout(tmp_path, name):
    root = data_dir(tmp_path)
    rel, bad, message = BAD_LINES[name]
    path = root / rel
    lines = path.read_bytes().decode("latin-1").splitlines()
    lines.insert(2, bad)  # the third line of the file
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(LmlabError) as err:
        load_task(name, root)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value), str(err.value)
