"""Shared by the bench scripts: the machine line, contention, and docs/benchmarks.md
sections (each script rewrites its own section only, between markers)."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    return (f"{platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, "
            f"{cpu_name()}, no GPU)")


def cpu_name() -> str:
    """The CPU's model name and whether it multiplies bf16 natively, which decides what
    `--dtype auto` computes in (common/precision.py): results of the two do not compare.
    Read from /proc/cpuinfo's flags (amx_tile, avx512_bf16), the features torch's own
    probes report, without importing torch."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        return name
    native = bool(flags & {"amx_tile", "avx512_bf16"})
    return f"{name}, {'with native bf16: dtype auto = bfloat16' if native else 'no native bf16: dtype auto = float32'}"


def load_average() -> str:
    """The 1-minute load average: above the core count, other jobs took CPU from us."""
    return f"{os.getloadavg()[0]:.1f}"


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def write_section(name: str, lines: list[str], doc: Path = DOC) -> None:
    """Replace (or append) the section ``name`` of ``doc`` (docs/benchmarks.md)."""
    start, end = f"<!-- section:{name} -->", f"<!-- end:{name} -->"
    block = "\n".join([start, *lines, end])
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def run_timed(cmd: list[str], log_path: Path, env: dict | None = None,
              sample_memory: bool = False) -> tuple[list[tuple[float, str]], float, dict]:
    """Run ``cmd``; return its output lines stamped with seconds since start, the wall
    time, and (with ``sample_memory``) the peak memory of its whole process tree."""
    import subprocess
    import threading

    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace")
    sampler = TreeMemory(child.pid) if sample_memory else None
    if sampler:
        threading.Thread(target=sampler.run, daemon=True).start()
    lines = []
    with open(log_path, "w") as log:
        for line in child.stdout:
            stamp = time.perf_counter() - started
            lines.append((stamp, line.rstrip("\n")))
            log.write(f"{stamp:9.2f} {line}")
    code = child.wait()
    wall = time.perf_counter() - started
    if sampler:
        sampler.stop = True
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; see {log_path}")
    return lines, wall, (sampler.peak() if sampler else {})


class TreeMemory:
    """Samples the memory of a process and all its descendants (Ray's raylet, GCS and
    workers included) once per ``interval`` seconds (PSS every ``PSS_EVERY``-th); keeps
    the peak of the sums.

    RSS counts pages shared between processes (libraries, copy-on-write) once per
    process; PSS splits them, so the PSS sum is what the tree really holds."""

    # PSS needs each process's smaps (psutil's memory_full_info): reading them every
    # second for 13 processes took half a core of the 2 being measured, so PSS is read
    # every PSS_EVERY-th sample and RSS (cheap: /proc/PID/statm) every sample.
    PSS_EVERY = 5

    def __init__(self, pid: int, interval: float = 1.0):
        self.pid, self.interval, self.stop = pid, interval, False
        self.peak_rss = self.peak_pss = 0
        self.peak_procs, self.peak_one = 0, 0
        self.samples = 0

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        with_pss = self.samples % self.PSS_EVERY == 0
        self.samples += 1
        rss = pss = one = 0
        for proc in procs:
            try:
                info = proc.memory_full_info() if with_pss else proc.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss, one = rss + info.rss, pss + getattr(info, "pss", info.rss), max(one, info.rss)
        self.peak_rss = max(self.peak_rss, rss)
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs, self.peak_one = max(self.peak_procs, len(procs)), max(self.peak_one, one)

    def run(self) -> None:
        while not self.stop:
            self.sample()
            time.sleep(self.interval)

    def peak(self) -> dict:
        return {"rss-mb": self.peak_rss / 1e6, "pss-mb": self.peak_pss / 1e6,
                "processes": self.peak_procs, "largest-process-rss-mb": self.peak_one / 1e6}
