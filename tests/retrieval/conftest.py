import pytest
from retrieval_fakes import BagOfWords


@pytest.fixture(scope="session")
def minilm_path():
    """The all-MiniLM-L6-v2 folder, downloaded once into $LMLAB_HOME; skips when it cannot be had."""
    from lmlab import hub
    from lmlab.errors import LmlabError

    try:
        return hub.resolve("all-minilm-l6-v2")
    except LmlabError as e:
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")


@pytest.fixture
def bag_of_words():
    return BagOfWords()
