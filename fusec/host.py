"""What the operating system says about the machine fusec runs on: cache sizes, cores, clock, SIMD width
and RAM, each with where it was read. Plain figures, no Machine: `machines.cpu()` builds the Machine the
Numba backend targets from them. Every reading has a fallback, so a sandbox without /sys or /proc still
gets a (tagged [M]) figure rather than an error."""
from __future__ import annotations

import os
import re
from typing import NamedTuple

KiB, MiB, GiB = 2**10, 2**20, 2**30

_CACHE_SYSCONF = {1: "SC_LEVEL1_DCACHE_SIZE", 2: "SC_LEVEL2_CACHE_SIZE", 3: "SC_LEVEL3_CACHE_SIZE"}
_CACHE_FALLBACK = {1: 32 * KiB, 2: 1 * MiB, 3: 8 * MiB}


class HostFigures(NamedTuple):
    cores: int
    caches: tuple[tuple[int, str], ...]   # (bytes per core, source) of L1d, L2, L3 (L3 whole)
    clock_hz: float
    clock_source: str
    lanes: int                            # f32 SIMD width
    ram_bytes: int


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)", text.upper())
    return int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[m.group(2)] if m else 0


def _cpu_count(cpu_list: str) -> int:
    """Number of CPUs in a list like '0-3,8'."""
    n = 0
    for part in filter(None, cpu_list.split(",")):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def cache_size(level: int, root: str = "/sys/devices/system/cpu/cpu0/cache") -> tuple[int, str]:
    """(bytes per core, source) of the data/unified cache at `level`: os.sysconf, else sysfs, else a
    fallback. A sysfs cache shared by several CPUs is divided among them (L3 is reported whole)."""
    name = _CACHE_SYSCONF[level]
    if name in os.sysconf_names:
        try:
            if (v := os.sysconf(name)) > 0:
                return v, f"os.sysconf({name}) [P]"
        except (OSError, ValueError):
            pass
    for index in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        d = os.path.join(root, index)
        if _read(f"{d}/level") == str(level) and _read(f"{d}/type") in ("Data", "Unified"):
            size, sharing = _size(_read(f"{d}/size")), _cpu_count(_read(f"{d}/shared_cpu_list")) or 1
            if size > 0:
                per = size if level == 3 else size // sharing
                return per, f"{d}/size" + (f" / {sharing} CPUs sharing it" if per != size else "") + " [P]"
    return _CACHE_FALLBACK[level], "fallback default: the cache size could not be read [M]"


def _cpuinfo_field(name: str) -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def read_host() -> HostFigures:
    """The figures of this machine, read from the OS (cores this process may use, not all of them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    caches = tuple(cache_size(level) for level in (1, 2, 3))
    khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    mhz = _cpuinfo_field("cpu MHz")
    clock, s_clock = ((int(khz) * 1e3, "cpufreq cpuinfo_max_freq [P]") if khz.isdigit() else
                      (float(mhz) * 1e6, "/proc/cpuinfo cpu MHz [P]") if mhz else
                      (2.5e9, "fallback default [M]"))
    flags = set(_cpuinfo_field("flags").split())
    lanes = 16 if "avx512f" in flags else 8 if flags & {"avx", "avx2"} else 4
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        ram = 8 * GiB
    return HostFigures(cores, caches, clock, s_clock, lanes, ram)
