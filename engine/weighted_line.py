"""A step's cost as a line fitted online: the step budget fits seconds against prefill tokens, the
speculator seconds against decode rows, both from the engine's own recent steps."""

from __future__ import annotations


class WeightedLine:
    """Exponentially weighted least-squares line y = intercept + slope x, updated one point at a time."""

    def __init__(self, smoothing: float) -> None:
        self.keep = 1.0 - smoothing
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        k = self.keep
        self.w, self.x, self.y = k * self.w + 1, k * self.x + x, k * self.y + y
        self.xx, self.xy = k * self.xx + x * x, k * self.xy + x * y

    def fit(self) -> tuple[float, float] | None:
        """(intercept >= 0, slope > 0), or None while the points cannot tell a positive slope."""
        if self.w == 0:
            return None
        mean_x, mean_y = self.x / self.w, self.y / self.w
        var_x = self.xx / self.w - mean_x * mean_x
        if var_x < 1.0:  # every point at (almost) the same x: no slope to tell
            return None
        slope = (self.xy / self.w - mean_x * mean_y) / var_x
        if slope <= 0:
            return None
        return max(mean_y - slope * mean_x, 0.0), slope
