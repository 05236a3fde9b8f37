"""Limits: the budget of one task, and parsing of sizes like ``"256MiB"``."""

from __future__ import annotations

import dataclasses
import re

__all__ = ["Limits", "parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str | None, *, what: str) -> int | None:
    """Return ``value`` in bytes: an int, or a string such as ``"512MiB"`` or ``"2GB"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        msg = f"{what} must be a number of bytes or a string like '256MiB', not {value!r}."
        raise TypeError(msg)
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            msg = (
                f"{what}={value!r} is not a size bgtasks understands; "
                "use bytes as an int or a string like '256MiB', '1.5GiB' or '500MB'."
            )
            raise ValueError(msg)
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        kind = type(value).__name__
        msg = f"{what} must be a number of bytes or a string like '256MiB', not {kind}."
        raise TypeError(msg)
    if n <= 0:
        msg = f"{what} must be positive, got {value!r}; use None for no limit."
        raise ValueError(msg)
    return n


def _check_seconds(value: float | None, *, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{what} must be a number of seconds or None, not {value!r}."
        raise TypeError(msg)
    if not value > 0:
        msg = f"{what} must be positive, got {value!r}; use None for no limit."
        raise ValueError(msg)
    return float(value)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """The budget of one attempt of a task; ``None`` means unlimited.

    - ``wall_clock``: seconds from the start of the attempt.
    - ``cpu_time``: CPU seconds the task itself used (coroutine steps on the event
      loop, or the worker thread of a sync function).
    - ``memory``: bytes or a string like ``"256MiB"``; only under
      ``isolation="process"``.
    """

    wall_clock: float | None = None
    cpu_time: float | None = None
    memory: int | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "wall_clock", _check_seconds(self.wall_clock, what="Limits.wall_clock")
        )
        object.__setattr__(self, "cpu_time", _check_seconds(self.cpu_time, what="Limits.cpu_time"))
        object.__setattr__(self, "memory", parse_size(self.memory, what="Limits.memory"))

    @property
    def memory_bytes(self) -> int | None:
        """``memory`` as bytes (it is always normalised to an int)."""
        assert not isinstance(self.memory, str)
        return self.memory

    def merged(self, override: Limits | None) -> Limits:
        """Fields set on ``override`` win over ours."""
        if override is None or self.unlimited:
            return override or self
        return Limits(
            wall_clock=override.wall_clock if override.wall_clock is not None else self.wall_clock,
            cpu_time=override.cpu_time if override.cpu_time is not None else self.cpu_time,
            memory=override.memory if override.memory is not None else self.memory,
        )

    @property
    def unlimited(self) -> bool:
        return self.wall_clock is None and self.cpu_time is None and self.memory is None


NO_LIMITS = Limits()
