"""Peak memory of a process: CUDA's allocator statistics on GPUs, the resident set on Linux CPUs."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["reset_peak_memory", "peak_memory_bytes", "PeakMemory"]


def _proc_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device=None) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak resident set (VmHWM)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device=None) -> int:
    """Peak memory since the last :func:`reset_peak_memory`: CUDA allocated bytes, else peak resident set size."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` (bytes) and ``m.extra`` (peak minus memory at entry)."""

    def __init__(self, device=None):
        self.device = device

    def __enter__(self):
        reset_peak_memory(self.device)
        if self.device is not None and torch.device(self.device).type == "cuda":
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _proc_status("VmRSS") or 0
        return self

    def __exit__(self, *exc):
        self.peak = peak_memory_bytes(self.device)
        self.extra = self.peak - self.start
        return False

