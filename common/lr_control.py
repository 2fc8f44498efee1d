"""Server-side control from a measured loss: the clients' learning rate on a plateau,
and early stopping. Plain Python + torch (no ``flwr``): the ServerApp's round hook
(server/app.py) and ``fedtune train`` (server/centralized.py) both drive it.

The plateau rule is torch's own: :class:`torch.optim.lr_scheduler.ReduceLROnPlateau`
stepping a stand-in optimizer whose only job is to hold the current learning rate.
Re-implementing the rule (patience, factor, cooldown, min lr, relative threshold) would
be a second copy to keep in step with torch's; the stand-in costs one empty tensor.

The optional increase ("bold driver": Vogl et al. 1988, "Accelerating the convergence of
the back-propagation method"; Battiti 1989, "Accelerated backpropagation learning: two
optimization methods") is hand-written: neither torch nor transformers has a scheduler
that raises the rate when the loss improves. It reads torch's own verdict (did the step
move ``best``?), so "improved" uses exactly torch's relative threshold. So is the
undo of Battiti's full rule ('lr-plateau-reject': a step that did not lower the loss is
discarded, the weights go back to the last accepted ones, and the rate is cut): torch's
schedulers change only the rate, never the weights. This module says which round to
undo (``LossControl.rejected``); server/control.py undoes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# What a resumed run takes back from the saved state: the counters and the current
# rate. The settings (factor, patience, ...) come from the resumed run's config.
_PLATEAU_STATE = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch", "_last_lr")


class PlateauLR:
    """The clients' peak learning rate, cut by ``factor`` when the loss stops improving
    and, with ``increase`` > 1, raised when it improves.

    ``ReduceLROnPlateau(mode='min', threshold_mode='rel')``: a loss counts as better
    when it is below ``best * (1 - threshold)``; after more than ``patience`` rounds
    without one, lr <- max(lr * factor, min_lr), then ``cooldown`` rounds in which bad
    rounds are not counted. Source: torch.optim.lr_scheduler.ReduceLROnPlateau.
    Bold driver (``increase`` > 1): after a round that was better, lr <- lr * increase,
    capped at ``max_lr`` (0: no cap). A better round never cuts (torch resets its bad
    count to 0 on it), so a round raises, cuts or keeps the rate, never two of these.
    The first round always counts as better (torch's ``best`` starts at +inf).
    ``increase`` 1.0 is torch's rule alone. :attr:`improved` is the last step's verdict,
    which 'lr-plateau-reject' reads to undo a round that was not better.

    Args (keyword-only): lr (the initial rate, > 0), factor in (0, 1), patience >= 0,
    cooldown >= 0, min_lr >= 0, threshold >= 0, increase >= 1, max_lr 0 or >= lr.
    Raises ValueError on any other value.
    """

    def __init__(self, *, lr: float, factor: float, patience: int, cooldown: int = 0,
                 min_lr: float = 0.0, threshold: float = 1e-4, increase: float = 1.0,
                 max_lr: float = 0.0):
        if not lr > 0:
            raise ValueError(f"PlateauLR: lr must be > 0, got {lr}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"PlateauLR: factor must be in (0, 1), got {factor}")
        if patience < 0 or cooldown < 0 or min_lr < 0 or threshold < 0:
            raise ValueError("PlateauLR: patience, cooldown, min_lr and threshold must be >= 0, "
                             f"got {patience}, {cooldown}, {min_lr}, {threshold}")
        if not (increase >= 1.0 and math.isfinite(increase)):
            raise ValueError(f"PlateauLR: increase must be a finite number >= 1, got {increase}")
        if not (max_lr == 0.0 or max_lr >= lr):
            raise ValueError(f"PlateauLR: max_lr must be 0 (no cap) or >= lr {lr}, got {max_lr}")
        self.increase, self.max_lr = float(increase), float(max_lr)
        self.improved = False  # the last step's verdict: did the loss beat the best?
        # The stand-in optimizer: one empty parameter, never stepped; it holds the lr.
        self._holder = torch.optim.SGD([torch.zeros(0, requires_grad=True)], lr=lr)
        self._rule = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self._holder, mode="min", factor=factor, patience=patience, cooldown=cooldown,
            min_lr=min_lr, threshold=threshold, threshold_mode="rel")

    @property
    def lr(self) -> float:
        """The current rate: what the next round's clients use as their peak lr."""
        return float(self._holder.param_groups[0]["lr"])

    def step(self, loss: float) -> float:
        """Record one round's loss (a NaN counts as no improvement); return the new lr."""
        best_before = self._rule.best
        self._rule.step(math.inf if math.isnan(loss) else loss)
        # torch moved `best` iff the loss beat it by the threshold: "improved". Not
        # num_bad_epochs == 0, which torch also sets after a cut and during cooldown.
        self.improved = self._rule.best != best_before
        if self.increase > 1.0 and self.improved:
            raised = self.lr * self.increase
            if self.max_lr:
                raised = min(raised, self.max_lr)
            self._holder.param_groups[0]["lr"] = raised
            self._rule._last_lr = [raised]  # what state_dict saves (torch's own field)
        return self.lr

    def seed(self, loss: float) -> None:
        """Set torch's ``best`` to ``loss`` (the loss before training), so that the first
        step counts as better only if it beats it. NaN/inf leave ``best`` at +inf."""
        if math.isfinite(loss):
            self._rule.best = float(loss)

    def state_dict(self) -> dict[str, Any]:
        """Counters and rate, JSON-serialisable (floats round-trip exactly through
        Python's json, which writes ``repr``; ``inf`` as ``Infinity``)."""
        state = {k: self._rule.state_dict()[k] for k in _PLATEAU_STATE}
        state["_last_lr"] = [float(v) for v in state["_last_lr"]]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of :meth:`state_dict`: torch's ``load_state_dict`` for the
        counters, and the stand-in optimizer's rate (torch restores only the former)."""
        missing = [k for k in _PLATEAU_STATE if k not in state]
        if missing:
            raise ValueError(f"plateau controller state lacks {missing}: the run was saved by "
                             "an older fedtune or without lr-plateau; resume with its settings")
        self._rule.load_state_dict({k: state[k] for k in _PLATEAU_STATE})
        self._holder.param_groups[0]["lr"] = float(state["_last_lr"][0])


@dataclass
class EarlyStopping:
    """Stop after ``patience`` consecutive rounds without a loss below the best so far.

    ``patience`` 0 never stops. ``best`` starts at the loss before training (round 0),
    so a run that never beats its starting point stops after ``patience`` rounds.
    """

    patience: int
    best: float = math.inf
    best_round: int = 0
    since_best: int = 0

    def update(self, loss: float, server_round: int = 0) -> bool:
        """Record one round's loss; True when the run should stop now."""
        if loss < self.best:  # NaN is never lower
            self.best, self.best_round, self.since_best = loss, server_round, 0
        else:
            self.since_best += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    def reason(self) -> str:
        return (f"validation loss has not improved for {self.since_best} rounds "
                f"(best {self.best:.4f} after round {self.best_round}; "
                f"early-stopping-patience {self.patience})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_round": self.best_round, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_round = float(state["best"]), int(state["best_round"])
        self.since_best = int(state["since_best"])


class LossControl:
    """The controllers one run uses, from its config: ``plateau`` (None unless
    'lr-plateau') and ``stopper`` (never stops unless 'early-stopping-patience')."""

    def __init__(self, cfg):
        self.plateau = None if not cfg.lr_plateau else PlateauLR(
            lr=cfg.lr, factor=cfg.lr_plateau_factor, patience=cfg.lr_plateau_patience,
            cooldown=cfg.lr_plateau_cooldown, min_lr=cfg.lr_plateau_min_lr,
            threshold=cfg.lr_plateau_threshold, increase=cfg.lr_plateau_increase,
            max_lr=cfg.lr_plateau_max_lr)
        self.stopper = EarlyStopping(cfg.early_stopping_patience)
        # lr-plateau-reject: the last round is undone when the plateau rule did not
        # count it as better (server/control.py restores the last accepted adapter)
        self.reject = bool(cfg.lr_plateau_reject) and self.plateau is not None
        self.rejected = False

    @property
    def active(self) -> bool:
        return self.plateau is not None or bool(self.stopper.patience)

    def lr(self, default: float) -> float:
        return self.plateau.lr if self.plateau is not None else default

    def start(self, loss: float) -> None:
        """The loss before training: early stopping's first 'best'. The plateau rule
        starts at its first training round, as torch's does at its first epoch; except
        under 'lr-plateau-reject', where round 1 must beat this loss too, or the undo
        could keep a first round that made the model worse."""
        self.stopper.best = loss
        if self.reject:
            self.plateau.seed(loss)

    def update(self, loss: float, server_round: int) -> bool:
        """One round's loss into both controllers; True when the run should stop."""
        if self.plateau is not None:
            self.plateau.step(loss)
        self.rejected = self.reject and not self.plateau.improved
        return self.stopper.update(loss, server_round)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"stopper": self.stopper.state_dict()}
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "stopper" in state:
            self.stopper.load_state_dict(state["stopper"])
        if self.plateau is not None:
            if "plateau" not in state:
                raise ValueError("cannot turn on 'lr-plateau' when resuming a run that ran "
                                 "without it: resume with its settings or start a new run")
            self.plateau.load_state_dict(state["plateau"])
