"""The retrain loop's decisions: champion vs challenger on the same held-out data.

The ``retrain`` flow (flows/retrain.py) and ``segpipe retrain`` call these steps; each
is a plain function so it can be run and tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segpipe.io.storage import join

#: metrics are recorded to ~4 decimals; a difference this small is float rounding, not a real one
_EPS = 1e-9


@dataclass(frozen=True)
class Decision:
    """Whether the challenger replaces the champion, and why (one sentence)."""

    promote: bool
    reason: str
    champion_mean_iou: float | None
    challenger_mean_iou: float | None


def decide(champion: dict[str, Any] | None, challenger: dict[str, Any], margin: float) -> Decision:
    """Promote when there is no champion, or the challenger's mean IoU beats it by at least ``margin``.

    Both metrics must come from the same held-out split (the flow evaluates both on it).
    A challenger without a mean IoU (nothing scored) is never promoted over a champion.
    """
    new = challenger.get("mean_iou")
    if champion is None:
        return Decision(True, "no champion yet", None, new)
    old = champion.get("mean_iou")
    if new is None:
        return Decision(False, "challenger has no mean IoU (nothing scored)", old, new)
    if old is None:
        return Decision(True, "champion has no mean IoU on this split", old, new)
    # "by at least margin", in decimal terms: 0.3 beats 0.1 by 0.2 although 0.1 + 0.2 > 0.3 in binary
    if new - old >= margin - _EPS:
        return Decision(True, f"mean IoU {new:.4f} beats champion {old:.4f} by ≥ {margin:g}", old, new)
    return Decision(False, f"mean IoU {new:.4f} does not beat champion {old:.4f} by {margin:g}", old, new)


def run_dir(root: str, stamp: str) -> dict[str, str]:
    """Where one retrain run writes: the challenger artifact, both evaluations and the comparison."""
    base = join(root, stamp)
    return {"base": base, "challenger": join(base, "challenger"), "eval_challenger": join(base, "eval-challenger"),
            "eval_champion": join(base, "eval-champion"), "report": join(base, "report")}
