"""Memory of the current process from ``/proc/self`` (Linux), shared by the benchmarks that
measure one job per child process (``bench_train.py``, ``bench_3d.py``). Values in KiB."""
from __future__ import annotations

import resource
from typing import Optional


def status_kb(key: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (e.g. ``VmRSS``, ``VmHWM``), or None if unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    """Peak resident set size: VmHWM, else ``getrusage`` maxrss (KiB on Linux)."""
    hwm = status_kb("VmHWM")
    if hwm is not None:
        return hwm

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rss_kb() -> int:
    """Current resident set size (the peak where VmRSS is unavailable)."""
    rss = status_kb("VmRSS")
    return rss if rss is not None else peak_rss_kb()
