"""lmlab.utils: atomic writes keep the old file on failure, suggestions, progress lines, dtype names."""
import os

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.utils import atomic, device, progress, suggest


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "r.json"
    atomic.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(path) as f:
            f.write("{half")
            raise RuntimeError("killed")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_folder_swaps_and_survives_failure_and_stale_aside(tmp_path):
    folder = tmp_path / "ckpt"
    with atomic.atomic_folder(folder) as t:
        (t / "w").write_text("old")
    (tmp_path / ".ckpt.old").mkdir()  # a stale aside-folder from an earlier crash is no obstacle
    with pytest.raises(RuntimeError):
        with atomic.atomic_folder(folder) as t:
            (t / "w").write_text("new, half")
            raise RuntimeError("killed")
    assert (folder / "w").read_text() == "old"
    with atomic.atomic_folder(folder) as t:
        (t / "w").write_text("new")
    assert (folder / "w").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~_umask()


def test_check_writable(tmp_path):
    atomic.check_writable(tmp_path / "new" / "deeper" / "r.json")
    (tmp_path / "f").write_text("")
    with pytest.raises(LmlabError, match="not a writable folder"):
        atomic.check_writable(tmp_path / "f" / "r.json")


def test_suggestions():
    assert suggest.did_you_mean("warmup_iter", ["warmup_iters", "max_iters"]) == " (did you mean 'warmup_iters'?)"
    assert suggest.did_you_mean("zzz", ["warmup_iters"]) == ""
    msg = suggest.unknown("sampler", "randm", ["random", "first_n"])
    assert "did you mean 'random'" in msg and "first_n, random" in msg


def test_progress_plain_lines(capsys):
    p = progress.Progress(4, "eval", every_s=0.0)
    p.set(acc=0.5)
    p.update(2)
    p.update(2)
    p.close()
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("eval: 4/4 it") and "acc 0.5" in err[-1]


def test_dtypes_and_devices():
    assert device.parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(LmlabError, match="unknown dtype 'fp8'"):
        device.parse_dtype("fp8")
    with pytest.raises(LmlabError, match="unknown device 'tpu'"):
        device.resolve_device("tpu")
    assert device.resolve_device("cpu").type == "cpu"
    with pytest.raises(LmlabError, match="--threads"):
        device.set_threads(0)
