import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helpers such as tiny_gguf


def _preset_or_skip(name: str, what: str):
    """A shipped preset's file or folder, downloaded once into $LMLAB_HOME; skips when it cannot be had."""
    from lmlab import hub
    from lmlab.errors import LmlabError

    try:
        return hub.resolve(name)
    except LmlabError as e:
        pytest.skip(f"{what} not available: {e}")


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M GGUF."""
    return _preset_or_skip("smollm2-135m", "SmolLM2-135M")


@pytest.fixture(scope="session")
def minilm_path():
    """The all-MiniLM-L6-v2 HF folder."""
    return _preset_or_skip("all-minilm-l6-v2", "all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from lmlab.checkpoints import load

    return load(str(smollm2_path))


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that runs a model with `threads=1` in-process (RunConfig) sets torch's global thread count;
    restore it so later tests do not run on one core."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cli_fallback_fails(monkeypatch):
    """A command run in this process that reaches the CLI's catch-all (an exception other than LmlabError)
    fails the test, whatever the test itself checks (subprocess runs: tests/test_cli.py's lmlab())."""
    from lmlab import cli

    def fail(command, e):
        pytest.fail(f"`lmlab {command}` reached the CLI fallback: {type(e).__name__}: {e}")

    monkeypatch.setattr(cli, "unexpected", fail)


@pytest.fixture(autouse=True)
def _kernel_cache_in_tmp(monkeypatch, tmp_path_factory):
    """Kernel timings that tests measure (prepare() in this process) and compiled steps go to a session folder,
    not to the real $LMLAB_HOME/kernels and /compiled (tests/inference/test_kernels.py puts the real location back under a tmp home)."""
    folder = tmp_path_factory.getbasetemp() / "kernel-cache"
    monkeypatch.setattr("lmlab.inference.kernels.cache_dir", lambda: folder)
    monkeypatch.setattr("lmlab.inference.compile.cache_dir", lambda: folder / "compiled")
