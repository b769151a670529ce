"""Set-up: `make demo` installs lmlab alone, `make test` the dev extras; the torch floor covers the APIs used."""
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_dry_run(target: str, tmp_path) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"  # a fresh venv path: make plans every step
    out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return out


def test_demo_installs_only_lmlab_and_test_adds_dev_extras(tmp_path):
    demo = make_dry_run("demo", tmp_path)
    installs = [line for line in demo.splitlines() if "pip install" in line]
    assert installs[1].endswith("torch==2.13.0") and "-e ." in installs[-1]  # torch pinned first
    assert not any("[dev]" in line for line in installs)
    test = make_dry_run("test", tmp_path)
    dev = [line for line in test.splitlines() if "[dev]" in line]
    assert dev and "-c " in dev[0]  # the dev extras are held to the pinned torch


# where each PyTorch API lmlab uses became available (from the PyTorch release notes / docs)
NEEDS = {"torch.distributed.fsdp.fully_shard (public)": (2, 6), "SDPA enable_gqa": (2, 5), "F.rms_norm": (2, 4)}


def test_torch_floor_covers_the_apis_used():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\b", d)]
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", spec).group(1).split(".")[:2])
    assert floor >= max(NEEDS.values()), spec
    code = "\n".join(p.read_text() for p in (ROOT / "lmlab").rglob("*.py"))
    assert "fully_shard" in code and "enable_gqa" in code  # still used, so the floor still matters
