"""Prompt rendering: demonstrations, separator, instruction, the query's context, channel parts, overrides,
and the verbalizer's checks."""
import pytest

from lmlab.errors import LmlabError
from lmlab.icl.prompt import Prompt, parse_verbalizer, unescape

P = Prompt("Review: {text}\nSentiment: {label}", {"neg": "bad", "pos": "good"})
DEMOS = [{"text": "loved it {really}", "label": "pos"}, {"text": "meh", "label": "neg"}]
QUERY = {"text": "fine film", "label": "pos"}


def test_direct_prompt():
    assert P.prefix(DEMOS) + P.query(QUERY) == ("Review: loved it {really}\nSentiment: good\n\n"
                                                "Review: meh\nSentiment: bad\n\nReview: fine film\nSentiment: ")


def test_instruction_and_separator():
    p = P.with_overrides(instruction="Classify.", separator="\n###\n")
    assert p.prefix(DEMOS[:1]) == "Classify.\n###\nReview: loved it {really}\nSentiment: good\n###\n"
    assert p.prefix([]) == "Classify.\n###\n"


def test_channel_template_derived_and_parts():
    assert P.channel_template == "Sentiment: {label}\nReview: {text}"
    assert P.prefix(DEMOS[1:], channel=True) == "Sentiment: bad\nReview: meh\n\n"
    assert P.channel_parts(QUERY, "neg") == ("Sentiment: bad", "\nReview: fine film")


def test_overrides_and_content_free():
    p = P.with_overrides(template="{text} => {label}", verbalizer=None)
    assert p.verbalizer == P.verbalizer and p.channel_template == "{label}\n{text} =>"
    assert p.query(QUERY) == "fine film => "
    assert P.content_free(QUERY, "N/A") == {"text": "N/A", "label": "pos"}


def test_bad_templates():
    with pytest.raises(LmlabError, match="must end with {label}"):
        Prompt("Sentiment: {label} Review: {text}", {"a": "b"})
    with pytest.raises(LmlabError, match="shows no input field"):
        Prompt("Sentiment: {label}", {"a": "b"})
    with pytest.raises(LmlabError, match="channel template"):
        Prompt("{text} {label}", {"a": "b"}, channel_template="{text} {label}")
    with pytest.raises(LmlabError, match="lacks"):
        P.query({"sentence": "x"}, "f.txt:3")


def test_verbalizer_checks():
    with pytest.raises(LmlabError, match="no word for label 'pos'"):
        Prompt("{text} {label}", {"neg": "bad"}).check_labels(["neg", "pos"], "task")
    with pytest.raises(LmlabError, match="word for label 'pos' is blank"):
        Prompt("{text} {label}", {"neg": "bad", "pos": " "}).check_labels(["neg", "pos"], "task")
    with pytest.raises(LmlabError, match="maps 'neutral', which is not a label"):
        Prompt("{text} {label}", {"neg": "a", "pos": "b", "neutral": "c"}).check_labels(["neg", "pos"], "t")
    with pytest.raises(LmlabError, match="tokenizes to nothing"):
        P.check_tokens(lambda s: [] if "bad" in s else [1], ["neg", "pos"])
    assert parse_verbalizer("neg=terrible, pos=great") == {"neg": "terrible", "pos": "great"}
    with pytest.raises(LmlabError, match="not LABEL=WORD"):
        parse_verbalizer("neg:terrible")
    assert unescape("a\\nb") == "a\nb"
