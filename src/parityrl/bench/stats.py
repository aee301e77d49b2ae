"""Repeated timings → median and spread; ratios of two interleaved series."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass
class Summary:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Summary":
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median:.4g} [{self.min:.4g}, {self.max:.4g}] (n={self.n})"


def ratios(numerators: list[float], denominators: list[float]) -> Summary:
    """Per-repetition ratios (repetitions were interleaved, so drift hits both sides alike)."""
    return Summary.of([a / b for a, b in zip(numerators, denominators, strict=True)])
