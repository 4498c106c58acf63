"""Omission-rate schedules of SAT: the Ladder Omission Rate Scheduler (LORS) and a constant rate."""

from __future__ import annotations

SCHEDULES = ("ladder", "constant")


def scheduled_rate(
    rate: float, step: int, max_steps: int | None, schedule: str = "ladder", ladder_steps: int = 4,
    dense_fraction: float = 0.25,
) -> float:
    """The omission rate at optimizer step ``step`` (0-based) of ``max_steps``.

    ``ladder``: training is split into a sparse part, the first ``(1 - dense_fraction) * max_steps`` steps, and a
    dense end. The sparse part has ``ladder_steps`` equal rungs; rung ``i`` (0-based) omits
    ``rate * (ladder_steps - i) / ladder_steps``, so the rate goes down in steps (r, ..., r/n) and training ends dense.
    ``constant``: ``rate`` at every step (no dense end; an ablation).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"omission rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return 0.0
    if schedule == "constant":
        return float(rate)
    if schedule != "ladder":
        raise ValueError(f"unknown sat_schedule {schedule!r}; known: {SCHEDULES}")
    if not max_steps or max_steps <= 0:
        raise ValueError("the ladder schedule needs the total number of optimizer steps (max_steps)")
    if ladder_steps < 1:
        raise ValueError("sat_ladder_steps must be >= 1")
    if not 0.0 <= dense_fraction <= 1.0:
        raise ValueError("sat_dense_fraction must be in [0, 1]")
    sparse_steps = int(round((1.0 - dense_fraction) * max_steps))
    if step >= sparse_steps:
        return 0.0
    rung = min(ladder_steps - 1, step * ladder_steps // max(sparse_steps, 1))
    return float(rate) * (ladder_steps - rung) / ladder_steps
