"""Knob grids that look beyond their edge.

A knob tuned on validation whose best value is the first or last of its grid (kNN-LM picking
T = 30000, the top of its grid) may do better further out. Such a grid is extended once in that
direction: toward a finite bound in ever finer steps (λ toward 0 or 1: 0.95 → 0.975, 0.99, 0.995;
the bound itself is not tried, λ = 1 is the memory alone), past an infinite one geometrically
with the grid's own last ratio (T: 30000 → 90000, 270000, 810000). The caller scores the new
values and reports the best, warning when even the extended grid ends at its best value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: How far toward a finite bound the extension goes: these fractions of the remaining gap are left.
TOWARD_BOUND = (0.5, 0.2, 0.1)
#: Geometric (or, for grids with non-positive values, arithmetic) steps past an infinite bound.
STEPS_PAST = 3


@dataclass(frozen=True)
class Extension:
    """New values for one knob whose best value sat at the ``edge`` (``"top"`` or ``"bottom"``)."""

    knob: str
    edge: str
    best: float
    values: tuple[float, ...]

    def describe(self) -> str:
        shown = ", ".join(f"{value:g}" for value in self.values)
        return f"{self.knob}={self.best:g} was the {self.edge} of its grid; also tried {shown}"


def default_bounds(values) -> tuple[float, float]:
    """A knob that declares no range: positive when its grid is, else unbounded."""
    return (0.0, math.inf) if min(values) > 0 else (-math.inf, math.inf)


def extend(knob: str, values, best: float, bounds: tuple[float, float] | None = None) -> Extension | None:
    """The values to try beyond ``best`` when it is an edge of ``values`` (at least three
    distinct numbers); None when it is inside the grid or already at its bound."""
    grid = sorted(set(float(value) for value in values))
    if len(grid) < 3 or best not in (grid[0], grid[-1]):
        return None
    low, high = bounds or default_bounds(grid)
    if best == grid[-1]:
        new = _beyond(best, grid[-2], high)
        edge = "top"
    else:
        new = _beyond(best, grid[1], low)
        edge = "bottom"
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        new = [round(value) for value in new]  # an integer knob (k) stays an integer
    new = tuple(sorted({value for value in new if value not in grid and low < value < high}))
    return Extension(knob, edge, best, new) if new else None


def _beyond(edge: float, neighbour: float, bound: float) -> list[float]:
    if math.isfinite(bound):  # finer and finer toward the bound
        return [bound + (edge - bound) * fraction for fraction in TOWARD_BOUND]
    if edge > 0 and neighbour > 0:
        ratio = edge / neighbour
        return [edge * ratio ** step for step in range(1, STEPS_PAST + 1)]
    step = edge - neighbour  # negative when extending downward
    return [edge + step * count for count in range(1, STEPS_PAST + 1)]


def numeric_knobs(points: list[dict]) -> dict[str, list[float]]:
    """The knobs of a list of settings that are numbers in every setting, with their values."""
    names = set(points[0]) if points else set()
    return {name: [point[name] for point in points] for name in sorted(names)
            if all(isinstance(point.get(name), (int, float)) and not isinstance(point.get(name), bool)
                   for point in points)}
