"""Devices, dtypes and CPU threads: the one place that names dtypes, resolves `--device`/`--dtype`
and says (once) which fallback it took. Nothing assumes a CPU: the same calls serve CUDA."""
from __future__ import annotations

import functools
import os
import platform
import sys

import torch

from lmlab.errors import LmlabError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NOTES: list[str] = []  # every fallback taken in this process, in order


def notice(message: str) -> None:
    """Tell the user (stderr, once per message) which fallback was taken."""
    if message not in NOTES:
        NOTES.append(message)
        print(f"lmlab: {message}", file=sys.stderr)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its name ('float32', 'bfloat16', 'float16') or itself; LmlabError for anything else."""
    if isinstance(name, torch.dtype):
        name = dtype_name(name)
    if name not in DTYPES:
        raise LmlabError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


# --------------------------------------------------------------------------- the CPU
def machine_threads() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_threads() -> int:
    """Usable cores minus those other processes keep busy (1-minute load average), at least 1.

    On a shared machine an intra-op thread whose core is taken makes every parallel kernel wait for it
    at the barrier (measured here: a 128-token forward took 9.2 s with 2 threads and 2.6 s with 1 while
    other jobs kept both cores busy)."""
    cores = machine_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, round(cores - busy)))


def set_threads(n: int | None = None) -> int:
    """Intra-op threads: `n`, or one per idle usable core."""
    n = idle_threads() if n is None else n
    if not isinstance(n, int) or n < 1:
        raise LmlabError(f"--threads: must be an integer >= 1, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU's model name (for benchmark reports: figures differ by vendor and generation)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak_flops(threads: int) -> float:
    """Rough float32 peak of `threads` CPU cores: FMA lanes per cycle (AVX-512 / AVX2 / other, two FMA
    units) times the clock /proc/cpuinfo reports (2.5 GHz when it says nothing). For MFU, not for claims."""
    flags = cpu_flags()
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    ghz = 2.5
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
        ghz = max(mhz) / 1000 if mhz else ghz
    except (OSError, ValueError):
        pass
    return per_cycle * ghz * 1e9 * threads


# --------------------------------------------------------------------------- what the hardware runs
def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively (not emulated) on this device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # other accelerators: let the backend decide
    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)  # x86 AVX-512 BF16 / AMX; Arm BF16
    return platform.machine().lower() in ("arm64",) and platform.system() == "Darwin"


def fp16_supported(device: torch.device | str = "cpu") -> bool:
    device = torch.device(device)
    if device.type != "cpu":
        return True
    return bool({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"} & cpu_flags())


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`--device` (None/'auto' = cuda when present, else cpu); a missing CUDA falls back to cpu with a notice."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LmlabError(f"unknown device '{name}' (e.g. cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise LmlabError(f"unknown device '{name}' (e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        notice(f"device '{name}' is not available here; falling back to cpu")
        return torch.device("cpu")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype to run in: the one asked for, or float32 where the hardware cannot run it natively."""
    dtype = parse_dtype(name)
    device = torch.device(device)
    where = "CPU" if device.type == "cpu" else f"device {device}"
    if dtype == torch.bfloat16 and not bf16_supported(device):
        notice(f"bfloat16 is not supported on this {where}; falling back to float32")
        return torch.float32
    if dtype == torch.float16 and not fp16_supported(device):
        notice(f"float16 is not supported on this {where}; falling back to float32")
        return torch.float32
    return dtype


def synchronize(device: torch.device | str) -> None:
    """Wait for the device (CUDA runs asynchronously; CPU needs nothing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on `device` (None when unknown): free GPU memory, or on a CPU the
    smaller of the system's available memory and what the cgroup limit leaves."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = []
    try:
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit.isdigit():
                free.append(int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return min(free) if free else None
