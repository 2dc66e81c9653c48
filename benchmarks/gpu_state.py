"""The GPU's SM clock, temperature and power over a benchmark row's timed window, sampled by nvidia-smi in the
background: a ratio of two rows measured a few minutes apart means little if one ran at a lower clock (a GPU near
its power or thermal limit lowers it), and this shows whether it did.

    with GpuSampler() as sampler:
        ...  # the row
    summary = window_summary(sampler.samples, start, end)  # the row's timed window, in time.time() seconds

One nvidia-smi process per row samples every `interval_ms` and stamps each line with its own clock, so nothing is
timed on arrival and no Python thread runs beside the row. Without nvidia-smi (a CPU machine) there are no samples.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

QUERY = "timestamp,clocks.sm,temperature.gpu,power.draw"


@dataclass(frozen=True)
class Sample:
    time: float  # seconds since the epoch, as time.time()
    sm_mhz: float
    temp_c: float
    power_w: float


def parse_samples(text: str) -> list[Sample]:
    """nvidia-smi's CSV lines (`--format=csv,noheader,nounits`) -> samples; a line with a value it could not read
    ('[N/A]', '[Not Supported]') or cut off by the end of sampling is skipped."""
    samples = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            stamp = datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # the machine's local time
            samples.append(Sample(stamp, *(float(value) for value in fields[1:])))
        except ValueError:
            continue
    return samples


class GpuSampler:
    """Samples the first visible GPU (CUDA_VISIBLE_DEVICES' first entry, else index 0) while in the `with` block."""

    def __init__(self, interval_ms: int = 500) -> None:
        self.interval_ms = interval_ms
        self.samples: list[Sample] = []
        self._proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "GpuSampler":
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        self._out = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                       f"--loop-ms={self.interval_ms}", "-i", gpu],
                                      stdout=self._out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._out.seek(0)
        self.samples = parse_samples(self._out.read())
        self._out.close()


def window_summary(samples: list[Sample], start: float, end: float) -> Optional[dict]:
    """The samples between `start` and `end`: median and lowest SM clock, highest temperature, mean power."""
    inside = [s for s in samples if start <= s.time <= end]
    if not inside:
        return None
    clocks = [s.sm_mhz for s in inside]
    return {"sm_mhz_median": statistics.median(clocks), "sm_mhz_min": min(clocks),
            "temp_c_max": max(s.temp_c for s in inside), "power_w_mean": statistics.fmean(s.power_w for s in inside),
            "samples": len(inside)}


def state_lines(results: list[dict]) -> list[str]:
    """A table of the rows' GPU state over their timed windows (rows with a `gpu_state`), or nothing."""
    rows = [r for r in results if r.get("gpu_state")]
    if not rows:
        return []
    lines = ["", "GPU state over each row's timed window (nvidia-smi, sampled every 0.5 s):", "",
             "| row | SM clock, median (lowest), MHz | highest temperature (°C) | mean power (W) | samples |",
             "|---|---|---|---|---|"]
    for r in rows:
        s = r["gpu_state"]
        lines.append(f"| {r['shape']} {r['label']} | {s['sm_mhz_median']:.0f} ({s['sm_mhz_min']:.0f}) "
                     f"| {s['temp_c_max']:.0f} | {s['power_w_mean']:.0f} | {s['samples']} |")
    return lines
