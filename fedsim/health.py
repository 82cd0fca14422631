"""Run health: the ``status`` field of ``summary.json``.

Every run is watched round by round (the harness does this whatever the strategy):

* **diverged at round r**: the first round whose train or test loss is not finite, in which
  every sampled client's reply was non-finite (the grid drops such replies, so the model
  stops moving and the loss alone would not show it), or whose train loss exceeds
  ``output.divergence_factor`` (default 10; 0 turns the explosion check off) times the
  reference loss: the initial model's test loss (evaluated before round 1), or the first
  recorded train loss if that is lower or there was no initial evaluation. A run whose loss
  grows ten-fold past where the untrained model started has left the region where training
  makes progress (SCAFFOLD beyond its step-size limit, a learning rate too large, a
  model-poisoning attack that destroyed the model); non-finite losses are always divergence.
* **no client trained in rounds ...**: every recorded round had no successful train reply
  (nobody sampled, or every client failed); the run's model is the initial one. The CLI exits
  with status 3. Rounds without training in an otherwise training run are listed in
  ``untrained_rounds`` and warned about, but do not change the status (sparse participation
  makes such rounds normal).
* **ok** otherwise. ``failed: ...`` is written by the recorder when an error ends the run.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("fedsim")

NO_TRAINING_EXIT = 3  # exit status of a run in which no round trained anyone


def ranges(rounds: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    spans: list[list[int]] = []
    for r in sorted(rounds):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _bad(x: Any) -> bool:
    return x is not None and not math.isfinite(float(x))


class RunHealth:
    """Watches the round records; :meth:`status` gives the summary's ``status``."""

    def __init__(self, divergence_factor: float = 10.0) -> None:
        self.factor = float(divergence_factor)
        self.ref_loss: float | None = None
        self.seen_train = False
        self.diverged_at: int | None = None
        self.reason = ""
        self.rounds: list[int] = []
        self.untrained: list[int] = []

    def set_initial_loss(self, loss: float) -> None:
        """The initial model's test loss (before round 1): the explosion check's reference."""
        if math.isfinite(float(loss)):
            self.ref_loss = float(loss) if self.ref_loss is None else min(self.ref_loss, float(loss))

    def update(self, row: dict[str, Any]) -> None:
        """Feed one round record (before non-finite values are nulled)."""
        r = int(row["round"])
        self.rounds.append(r)
        if not row.get("replied"):
            self.untrained.append(r)
        if self.diverged_at is not None:
            return
        train, test = row.get("train_loss"), row.get("test_loss")
        reason = ""
        if _bad(train) or _bad(test):
            reason = "non-finite " + ("train" if _bad(train) else "test") + " loss"
        elif row.get("sampled") and row.get("nonfinite", 0) == row["sampled"]:
            reason = "every client's reply was non-finite (dropped)"
        elif train is not None:
            if not self.seen_train:
                self.seen_train = True
                self.ref_loss = float(train) if self.ref_loss is None else min(self.ref_loss, float(train))
            if self.factor > 0 and float(train) > self.factor * self.ref_loss:
                reason = f"train loss {float(train):.4g} > {self.factor:g} x the reference {self.ref_loss:.4g}"
        if reason:
            self.diverged_at, self.reason = r, reason
            log.warning("run diverged at round %d (%s); it goes on, status records it", r, reason)

    def state_dict(self) -> dict[str, Any]:
        return dict(
            ref_loss=self.ref_loss, seen_train=self.seen_train, diverged_at=self.diverged_at, reason=self.reason,
            rounds=list(self.rounds), untrained=list(self.untrained),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ref_loss, self.diverged_at, self.reason = state["ref_loss"], state["diverged_at"], state["reason"]
        self.seen_train = bool(state.get("seen_train", self.ref_loss is not None))
        self.rounds, self.untrained = list(state["rounds"]), list(state["untrained"])

    def status(self) -> str:
        """``ok``, ``diverged at round r`` or ``no client trained in rounds ...``."""
        if self.rounds and len(self.untrained) == len(self.rounds):
            return f"no client trained in rounds {ranges(self.untrained)}"
        if self.diverged_at is not None:
            return f"diverged at round {self.diverged_at}"
        return "ok"

    def summary(self) -> dict[str, Any]:
        """Fields for ``summary.json`` (logs a warning for anything but ``ok``)."""
        status = self.status()
        out: dict[str, Any] = {"status": status}
        if self.diverged_at is not None:
            out["divergence"] = {"round": self.diverged_at, "reason": self.reason}
        if self.untrained:
            out["untrained_rounds"] = list(self.untrained)
            if status == "ok":
                log.warning("no client trained in %d of %d rounds (%s)", len(self.untrained), len(self.rounds),
                            ranges(self.untrained))
        if status != "ok":
            log.warning("run status: %s", status)
        return out
