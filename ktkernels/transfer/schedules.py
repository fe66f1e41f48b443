"""Loss-weight schedules of the seed methods."""

from __future__ import annotations

from ..checks import is_int


class AnnealedWeight:
    """Linear annealing of a loss weight (Venkatesan & Li 2016, the mentee networks' schedules).

    ``w(e) = start (1 - e/E) + end (e/E)`` for epochs ``e <= E`` and ``end`` afterwards; the authors' epoch counter
    starts at 1. E = 0 gives ``end`` from the start. Their supervised stage uses (2 -> 0.1 over 135) for the probe
    term and (2 -> 0 over 135) for the soft outputs.

    >>> w = AnnealedWeight(2.0, 0.1, 135)
    >>> w(0), round(w(135), 6), w(500)
    (2.0, 0.1, 0.1)
    """

    def __init__(self, start: float, end: float, epochs: int) -> None:
        if not is_int(epochs) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        self.start, self.end, self.epochs = float(start), float(end), int(epochs)

    def __call__(self, epoch: float) -> float:
        if not epoch >= 0:  # NaN too
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        if self.epochs == 0 or epoch >= self.epochs:
            return self.end
        frac = epoch / self.epochs
        return self.start * (1 - frac) + self.end * frac

    def __repr__(self) -> str:
        return f"AnnealedWeight(start={self.start}, end={self.end}, epochs={self.epochs})"
