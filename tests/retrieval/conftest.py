import pytest
from retrieval_fakes import BagOfWords


@pytest.fixture
def bag_of_words():
    return BagOfWords()
