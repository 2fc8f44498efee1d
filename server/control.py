"""Loss-driven control of a run, on the server: after every round the validation loss
of the new global adapter feeds ``lr-plateau`` (the next round's client lr) and early
stopping (the end of the run). The rules are in ``common/lr_control.py``; this module
evaluates, puts the lr in the round config, saves the state for ``--resume`` and ends
the run.

Undoing a round (``lr-plateau-reject``): when the rule says a round was not better,
``RoundHook`` puts the last accepted global adapter back into the model, saves that one
as the round's adapter and server state, and hands it to the strategy
(``TrafficMixin.next_arrays``) for the next round, instead of the aggregate that
Flower's loop would send; the history row says ``rejected-round`` 1. Flower's loop has
no hook to replace its arrays, hence the strategy attribute.

Choosing the server learning rate (``server-lr-search``): after aggregation the server
evaluates the validation loss of old + s * (aggregate - old) for each candidate s and
keeps the best one, handed to the next round the same way as an undone round's adapter.

Ending the run: Flower's ``Strategy.start`` has no stop hook, so ``RoundHook`` (its
``evaluate_fn``, the last step of a round, after the round's state is saved) raises
:class:`FederationStopped`, and ``server/app.py`` ``main`` catches it, reports what
stopping saved, and finishes the run as usual (exit status 0).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.config import ROUND_LR_KEY, RunConfig
from common.lr_control import LossControl
from common.model import set_adapter_state
from common.train import evaluate


class FederationStopped(Exception):
    """Raised after the last round that early stopping lets run; not an error."""

    def __init__(self, server_round: int, reason: str):
        super().__init__(f"early stop after round {server_round}: {reason}")
        self.server_round, self.reason = server_round, reason


class RoundControl:
    """The run's :class:`common.lr_control.LossControl`, fed by the validation loss.

    ``train_config``: the ConfigRecord ``Strategy.start`` passes to ``configure_train``
    every round (None in ``fedtune train``, which reads :attr:`lr` instead). With
    ``resumed_round`` > 0 the controllers' state saved with that round is restored.
    Raises ValueError when a resumed run had already stopped under the same patience.
    """

    def __init__(self, cfg: RunConfig, run, validation: list[dict], pad_token_id: int,
                 train_config=None, *, resumed_round: int = 0):
        self.cfg, self.validation, self.pad_id = cfg, validation, pad_token_id
        self.train_config = train_config
        self.loss_control = LossControl(cfg)
        # lr-plateau-reject: the last accepted global adapter (an ArrayRecord), set by
        # `kept` from round 0 on (a resumed run's round 0: its saved arrays, which are
        # the accepted ones, since the hook saves those)
        self.accepted = None
        if resumed_round:  # server/checkpoints.py check_resumable refused what cannot load
            self.loss_control.load_state_dict(run.load_state().control)
        self._publish()

    @property
    def active(self) -> bool:
        return self.loss_control.active and bool(self.validation)

    @property
    def lr(self) -> float:
        """The clients' peak lr for the next round."""
        return self.loss_control.lr(self.cfg.lr)

    def _publish(self) -> None:
        """Only under lr-plateau does the round config carry an lr (else the config's)."""
        if self.train_config is not None and self.loss_control.plateau is not None:
            self.train_config[ROUND_LR_KEY] = self.lr

    def _validation_loss(self, model) -> float:
        return evaluate(model, self.validation, batch_size=self.cfg.eval_batch_size,
                        pad_token_id=self.pad_id).loss

    def search_server_lr(self, model, aggregate: ArrayRecord,
                         previous: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """server-lr-search: the global adapter old + s * (aggregate - old) for the
        candidate s with the lowest validation loss (the first of equal ones; NaN losses
        lose), loaded into ``model``; returns it (``aggregate`` itself when s is 1) and
        the history columns 'server-lr' and 'val-loss'. Off (no candidates or no
        validation split): ``aggregate`` and no columns, ``model`` untouched.

        ``model`` must hold ``aggregate`` on entry. Costs one validation pass per
        candidate, on the server, while the clients wait. The server learning rate is
        FedAvg's global step size (Reddi et al. 2021, "Adaptive Federated
        Optimization"; Charles & Konecny 2020, "On the outsized importance of learning
        rates in local update methods"); here it is picked each round from the measured
        loss, a grid line search along the round's update, instead of being fixed. No
        library does that for a Flower strategy, hence this method. Both ArrayRecords:
        float32 adapters with the same names and shapes (the strategy's global arrays
        and aggregate)."""
        candidates = self.cfg.server_lr_candidates
        if not candidates or not self.validation:
            return aggregate, {}
        new = {k: a.numpy().astype(np.float32, copy=False) for k, a in aggregate.items()}
        old = {k: a.numpy().astype(np.float32, copy=False) for k, a in previous.items()}

        def stepped(s: float) -> dict[str, np.ndarray]:  # old + s * (aggregate - old)
            return {k: np.ascontiguousarray(old[k] + np.float32(s) * (v - old[k]))
                    for k, v in new.items()}

        losses = {}
        for s in candidates:
            set_adapter_state(model, aggregate.to_torch_state_dict() if s == 1.0 else
                              {k: torch.from_numpy(v) for k, v in stepped(s).items()})
            losses[s] = self._validation_loss(model)
        finite = [s for s in candidates if not math.isnan(losses[s])]
        # all NaN (a diverged round): the aggregate as is if 1 is a candidate; the loss
        # stays NaN for lr-plateau and early stopping to judge
        best_s = (min(finite, key=losses.__getitem__) if finite
                  else 1.0 if 1.0 in losses else candidates[0])
        best_loss = losses[best_s]
        chosen = (aggregate if best_s == 1.0 else
                  ArrayRecord({k: Array(v) for k, v in stepped(best_s).items()}))
        set_adapter_state(model, chosen.to_torch_state_dict())
        return chosen, {"server-lr": best_s, "val-loss": best_loss}

    def observe(self, model, server_round: int, loss: float | None = None) -> dict[str, float]:
        """The validation loss of ``model`` (the new global adapter) into the controllers
        (``loss``: already measured on it, by :meth:`search_server_lr`); returns the
        history columns: 'val-loss', and 'lr', the rate this round used."""
        if not self.active:
            return {}
        used = self.lr
        if loss is None:
            loss = self._validation_loss(model)
        if server_round == 0:
            self.loss_control.start(loss)
            return {"val-loss": loss}
        self.loss_control.update(loss, server_round)
        self._publish()
        if self.loss_control.rejected:
            return {"val-loss": loss, "lr": used, "rejected-round": 1}
        return {"val-loss": loss, "lr": used}

    def kept(self, arrays, rejected: bool):
        """lr-plateau-reject: the global adapter after this round. ``arrays`` (the round's
        aggregate, or the initial adapter) unless the round was rejected; then the last
        accepted one, the same object, so the undo is bit-exact.

        Flower's loop itself still holds the discarded aggregate (its ``Result.arrays``
        too, which fedtune does not read). It hands it back here only after a round that
        aggregated nothing; evaluation is deterministic and ``best`` only falls, so that
        loss is again not better and the aggregate is discarded again."""
        if not rejected:
            self.accepted = arrays
        return self.accepted

    def stop_if_done(self, server_round: int) -> None:
        """Raise :class:`FederationStopped` when early stopping says so (round > 0)."""
        stopper = self.loss_control.stopper
        if server_round > 0 and self.active and stopper.stopped:
            raise FederationStopped(server_round, stopper.reason())

    def state_dict(self) -> dict:
        return self.loss_control.state_dict()


def report_early_stop(cfg: RunConfig, run, stop: FederationStopped) -> dict:
    """Log why the run stopped and what it saved: the rounds not run, and the bytes
    and seconds they would have cost at this run's mean per round (an estimate: later
    rounds cost what earlier ones did). Also written to RUN_DIR/early-stop.json."""
    history = [r for r in run.history() if r["round"] > 0]
    left = cfg.num_server_rounds - stop.server_round
    per_round_mb = history[-1].get("mb-total", 0.0) / len(history) if history else 0.0
    per_round_s = history[-1].get("seconds", 0.0) / len(history) if history else 0.0
    saved = {"stopped-after-round": stop.server_round, "num-server-rounds": cfg.num_server_rounds,
             "rounds-saved": left, "mb-saved": round(left * per_round_mb, 3),
             "seconds-saved": round(left * per_round_s, 1), "reason": stop.reason}
    run.log(f"fedtune: {stop}")
    run.log(f"fedtune: early stopping saved {left} of {cfg.num_server_rounds} rounds "
            f"(~{saved['mb-saved']:.2f} MB and ~{saved['seconds-saved']:.0f} s at this run's "
            "mean per round)")
    from server.checkpoints import atomic_write_text

    atomic_write_text(run.path / "early-stop.json", json.dumps(saved, indent=2) + "\n")
    return saved

