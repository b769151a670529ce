"""lmlab's own CPU matrix-vector kernels (native/gemv.cpp), compiled on first use and cached.

`available()` builds the C++ source once per process with the system's C++ compiler (g++, or $LMLAB_CXX)
against the installed PyTorch, into $LMLAB_HOME/kernels/native-<hash>.so, the hash covering the source,
the torch version, the compiler's version and the CPU's flags (the build uses -march=native). A missing
compiler or a failed build prints one notice and leaves PyTorch's kernels in charge; nothing raises.
LMLAB_NATIVE=off disables the kernels; LMLAB_NATIVE_SCALAR=1 makes them take their plain scalar path.

Ops (CPU; x is M×K float32 or bfloat16, few rows; the output M×N has x's dtype):
    torch.ops.lmlab.int4_gemv(x, packed, scale, minimum, group_size)   lmlab's int4 layout (quantize.py)
    torch.ops.lmlab.int8_gemv(x, qweight, scale)                       int8 weights, a scale per row
    torch.ops.lmlab.bf16_gemv(x, w) / torch.ops.lmlab.f32_gemv(x, w)   bfloat16 / float32 weights
    torch.ops.lmlab.attend_cached(q, k, v, allowed, scale)           a few queries per row over the cache slots allowed
    torch.ops.lmlab.causal_attention(q, k, v, scale)                 a bfloat16 prompt's causal attention (S ≥ T keys)
    torch.ops.lmlab.causal_attention_fast(head_dim)                  whether that one is vectorized here
    torch.ops.lmlab.isa()                                              'avx512' or 'scalar'
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from lmlab.utils.device import cpu_flags, notice

SOURCE = Path(__file__).with_name("native") / "gemv.cpp"
ENV = "LMLAB_NATIVE"         # off: never build or use the kernels
ENV_CXX = "LMLAB_CXX"        # the compiler to use (default: g++, else c++)
SCALAR_ENV = "LMLAB_NATIVE_SCALAR"  # 1: the kernels take their scalar path (read by the C++ on every call)

_lock = threading.Lock()
_state: dict = {}  # "loaded": bool once decided; "path": the .so; "error": why not


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("off", "0", "false", "no")


def compiler() -> str | None:
    name = os.environ.get(ENV_CXX, "").strip()
    if name:
        return shutil.which(name)
    return shutil.which("g++") or shutil.which("c++")


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise OSError(f"{cxx} --version failed")
    return out.stdout.splitlines()[0] if out.stdout else cxx


def source_hash() -> str:
    """Which version of the kernels' source this is (measured timings of another version are stale)."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def cache_dir() -> Path:
    from lmlab.hub import home

    return home() / "kernels"


def library_path(cxx: str) -> Path:
    key = "\n".join([SOURCE.read_text(), torch.__version__, _compiler_version(cxx),
                     " ".join(sorted(cpu_flags())), sys.platform])
    return cache_dir() / f"native-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build_command(cxx: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    cmd = [cxx, "-O3", "-march=native", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [str(SOURCE), "-o", str(output), f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}",
            "-lc10", "-ltorch_cpu", "-ltorch"]
    return cmd


def build(cxx: str) -> Path:
    """Compile into the cache (atomically: a temp file renamed into place); the path of the library."""
    path = library_path(cxx)
    if path.is_file():
        return path
    notice(f"building lmlab's native CPU kernels with {Path(cxx).name} (once per machine and PyTorch version; "
           "up to a minute or two)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + "-", suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        out = subprocess.run(build_command(cxx, Path(tmp)), capture_output=True, text=True, timeout=900)
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise OSError(f"{Path(cxx).name} failed: {last[:200]}")
        os.chmod(tmp, 0o755)  # mkstemp made it private; the cache may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the ops compute on CPU tensors only)."""
    def rows(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    torch.library.register_fake("lmlab::int4_gemv")(lambda x, packed, scale, minimum, group_size: rows(x, packed))
    torch.library.register_fake("lmlab::int8_gemv")(lambda x, qweight, scale: rows(x, qweight))
    torch.library.register_fake("lmlab::bf16_gemv")(rows)
    torch.library.register_fake("lmlab::f32_gemv")(rows)
    torch.library.register_fake("lmlab::attend_cached")(lambda q, k, v, allowed, scale: q.new_empty(q.shape))
    torch.library.register_fake("lmlab::causal_attention")(
        lambda q, k, v, scale: q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2))


def available() -> bool:
    """Whether the native ops are loaded here (building them on the first call of the process)."""
    if not enabled():
        return False
    if "loaded" in _state:
        return _state["loaded"]
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _load()
    return _state["loaded"]


def _load() -> bool:
    if sys.platform == "win32":
        why = "native kernels are not built on Windows"
    elif (cxx := compiler()) is None:
        why = f"no C++ compiler found (g++/c++, or ${ENV_CXX})"
    else:
        try:
            path = build(cxx)
            if not hasattr(torch.ops.lmlab, "int4_gemv"):  # another build of the same ops may be loaded
                torch.ops.load_library(str(path))
                _register_fakes()
            _state["path"] = path
            return True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            why = f"building them failed ({e})"
    _state["error"] = why
    notice(f"lmlab's native CPU kernels are not available: {why}; using PyTorch's kernels")
    return False


def causal_attention_fast(head_dim: int) -> bool:
    """Whether causal_attention is vectorized here for heads this wide (AVX-512 BF16; else PyTorch's attention
    is the faster choice). False while torch.compile traces: the op then stays out of compiled graphs."""
    if torch.compiler.is_compiling() or not available():
        return False
    return bool(torch.ops.lmlab.causal_attention_fast(head_dim))


def reset() -> None:
    """Forget the decision (tests): the next available() decides again (a library once loaded stays loaded)."""
    with _lock:
        _state.clear()
