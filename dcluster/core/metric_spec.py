"""How a measured value is declared: its name, its part of the epoch line, and which way is
better. A method declares what its epochs measure (``Method.metrics``); the shared modules
(the epoch line, checkpoint.keep_best) read the declarations, so none of them names a method
and a new method's values need no edit there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

# where a value goes in the epoch line: after the loss, among the cluster scores (after the
# harness's NMI/ACC), or after the monitor's values
Place = Literal["after_loss", "scores", "after_monitor"]


@dataclass(frozen=True)
class Metric:
    """A value an epoch measures (a key of its metrics). ``line``: its part of the epoch line,
    a ``str.format`` template over the epoch's metrics (``"rotation loss {loss_rotation:.4f}"``),
    printed when the value was measured that epoch; "" for none. ``higher_is_better``: True or
    False for a value that ranks epochs (checkpoint.keep_best), None for one that does not."""
    name: str
    line: str = ""
    place: Place = "after_loss"
    higher_is_better: Optional[bool] = None

    def text(self, metrics: dict[str, float]) -> Optional[str]:
        """Its part of the line, or None when the epoch did not measure it."""
        return self.line.format(**metrics) if self.line and self.name in metrics else None


def declared(metrics: Sequence[Metric], name: str) -> Optional[Metric]:
    """The declaration of ``name`` among ``metrics``, or None."""
    return next((metric for metric in metrics if metric.name == name), None)
