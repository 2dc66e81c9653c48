"""Read the scalars of a run's TensorBoard event files (used by reports, sweeps and tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(run_dir: Union[str, Path]) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file under `run_dir`; a later file wins a repeated step
    (a resumed run re-logs the steps after its checkpoint)."""
    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}")
    scalars: dict[str, dict[int, float]] = {}
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series = scalars.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                series[event.step] = event.value
    return scalars
