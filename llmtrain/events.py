"""Read the scalars of a run's TensorBoard event files (used by reports, sweeps and tests). Light to import: the
writers, which need Lightning, are in llmtrain.training.step_log."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Union

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def accumulators(run_dir: Union[str, Path]) -> Iterator[EventAccumulator]:
    """The loaded event files under `run_dir`, oldest first (a resumed run writes a new file)."""
    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}")
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        yield accumulator


def read_scalars(run_dir: Union[str, Path]) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file under `run_dir`; a later file wins a repeated step
    (a resumed run re-logs the steps after its checkpoint)."""
    scalars: dict[str, dict[int, float]] = {}
    for accumulator in accumulators(run_dir):
        for tag in accumulator.Tags()["scalars"]:
            series = scalars.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                series[event.step] = event.value
    return scalars


def wall_clock(run_dir: Union[str, Path], tag: str) -> dict[int, float]:
    """Seconds of training at each logged step of `tag`, from the run's first logged event; the gap between a
    stopped run and its resumption is left out (each event file is one segment, placed after the one before)."""
    clock, offset = {}, 0.0
    for accumulator in accumulators(run_dir):
        tags = accumulator.Tags()["scalars"]
        times = [e.wall_time for t in tags for e in accumulator.Scalars(t)]
        if not times:
            continue
        start = min(times)
        if tag in tags:
            for event in accumulator.Scalars(tag):
                clock[event.step] = offset + event.wall_time - start
        offset += max(times) - start
    return clock
