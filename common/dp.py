"""Sample-level DP-SGD with Opacus: plan, accountant state, and the private wrapper.

The loop in ``common/train.py`` does not change under DP: :func:`private_training`
hands it a DP optimizer, an objective and Poisson-sampled batches in place of the
plain ones, and removes Opacus' hooks afterwards (the model is cached per process, so
it must leave as it came).

Large logical batches: one optimizer step takes an expected ``batch-size x grad-accum``
examples, drawn by Poisson sampling at that (logical) rate, split into ``grad-accum``
physical micro-batches; one noise draw and one step per logical batch, and the
accountant records the logical rate. Between micro-batches the per-example gradients
are clipped into a running sum and freed, with Opacus' own virtual step
(``DPOptimizer.signal_skip_step``, the mechanism of its ``BatchMemoryManager``), so
memory is that of one micro-batch. ``BatchMemoryManager`` itself wraps a DataLoader
and needs ``optimizer.step()`` after every physical batch, a variable number of them
per logical batch; our loop takes a fixed ``grad-accum`` micro-batches per step, so
the logical batch is split into that many near-equal parts instead (the split
``BatchSplittingSampler`` makes, by count rather than by maximum size).

The accountant's history is explicit state: a client keeps it in its Flower
``context.state`` so epsilon composes over the whole run instead of restarting every
round (the mistake of a new PrivacyEngine per round).

Why not ``PrivacyEngine.make_private``: it wraps a ``DataLoader`` whose empty Poisson
batches come out as a list of zero tensors, which a Hugging Face model cannot take,
and it cannot keep data-independent penalty terms out of the per-sample clipping.
We call the same Opacus parts it calls (``GradSampleModule``, ``DPOptimizer``,
``RDPAccountant``, ``get_noise_multiplier``) ourselves.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from common.config import RunConfig
from common.data import IGNORE_INDEX, collate

# Opacus' RDP accountant warns when the best order is at the end of its alpha grid: the
# epsilon it returns is then a valid but looser upper bound. Printed between the plan
# lines and by every Ray actor, it reads as an error; docs/privacy.md says what it means.
warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")


@dataclass(frozen=True)
class DPPlan:
    """What one client's DP-SGD uses for the whole run."""

    noise_multiplier: float
    sample_rate: float  # Poisson: each example joins each batch with this probability
    expected_batch_size: int
    max_grad_norm: float
    delta: float
    budget: float  # the epsilon a client may not exceed (0: no budget)
    planned_steps: int
    micro_batches: int = 1  # physical micro-batches per logical (Poisson) batch: grad-accum


def plan(cfg: RunConfig, *, num_examples: int, planned_steps: int) -> DPPlan:
    """The noise for the planned steps of the whole run, or a one-line error naming
    the setting that cannot work.

    The logical batch is ``batch-size x grad-accum`` expected examples: the sampling
    rate is that over ``num_examples`` (capped at 1), and the noise is calibrated to
    that rate over ``planned_steps`` logical steps (Opacus' ``get_noise_multiplier``).
    """
    if num_examples < 1:
        raise ValueError("DP-SGD needs at least one training example on every client")
    if cfg.dp_delta >= 1.0 / num_examples:
        raise ValueError(
            f"config 'dp-delta' = {cfg.dp_delta:g} is not below 1/{num_examples} (1 / this "
            f"client's examples): a delta that large allows leaking one record outright; "
            f"set --dp-delta below {1.0 / num_examples:.2g}"
        )
    sample_rate = min(1.0, cfg.batch_size * cfg.grad_accum / num_examples)
    noise = cfg.dp_noise_multiplier
    if noise == 0.0:
        noise = noise_for_budget(cfg.dp_target_epsilon, cfg.dp_delta, sample_rate,
                                 planned_steps)
    return DPPlan(noise_multiplier=noise, sample_rate=sample_rate,
                  expected_batch_size=max(1, round(sample_rate * num_examples)),
                  max_grad_norm=cfg.dp_max_grad_norm, delta=cfg.dp_delta,
                  budget=cfg.dp_target_epsilon, planned_steps=planned_steps,
                  micro_batches=cfg.grad_accum)


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant="rdp"))
    except ValueError:
        raise ValueError(
            f"config 'dp-target-epsilon' = {epsilon:g} cannot be reached in {steps} DP-SGD "
            f"steps at sampling rate {sample_rate:.3g} (delta {delta:g}): raise it, or take "
            "fewer steps (num-server-rounds x local-steps) or smaller batches"
        ) from None


def describe_plan(dp: DPPlan, *, num_examples: int, who: str) -> str:
    """One line of the plan, printed before training: the logical batch, sampling rate,
    steps, noise and the epsilon the planned steps spend (Opacus' RDP accountant)."""
    micro = dp.expected_batch_size / dp.micro_batches
    capped = (f" (every example: the logical batch is capped at the {num_examples:,} the "
              "client has)" if dp.sample_rate >= 1 else "")
    empty = ", most of them empty: lower grad-accum" if micro < 1 else ""
    return (f"DP-SGD plan, {who}: {num_examples:,} examples, logical batch "
            f"{dp.expected_batch_size} expected (sampling rate {dp.sample_rate:.4g}){capped} in "
            f"{dp.micro_batches} micro-batches of ~{max(micro, 1):.0f}{empty}, "
            f"{dp.planned_steps} steps, "
            f"noise multiplier {dp.noise_multiplier:.3g}, clip {dp.max_grad_norm:g}: epsilon "
            f"{Accountant().epsilon_after(dp, dp.planned_steps):.2f} at delta {dp.delta:g} "
            f"after the last planned step" + (f" (budget {dp.budget:g})" if dp.budget else ""))


def describe_settings(cfg: RunConfig) -> str:
    """The settings DP-SGD's utility hangs on, and whether the recipe chose them."""
    return (f"DP-SGD settings{' (dp-recipe on)' if cfg.dp_recipe else ''}: "
            f"lora-r {cfg.lora_r} on {cfg.lora_target_modules}"
            f"{', FFA-LoRA' if cfg.ffa_lora else ''}, lora-dropout {cfg.lora_dropout:g}, "
            f"lr {cfg.lr:g} {cfg.lr_schedule}, batch-size {cfg.batch_size} x grad-accum "
            f"{cfg.grad_accum}, clip {cfg.dp_max_grad_norm:g}, grad-sample-mode "
            f"{cfg.dp_grad_sample_mode}")


# --- the accountant, as state that travels ---------------------------------------------
class Accountant:
    """Opacus' RDP accountant with its history as JSON (for ``context.state``)."""

    def __init__(self, history: list | None = None):
        from opacus.accountants import RDPAccountant

        self._rdp = RDPAccountant()
        self._rdp.history = [tuple(h) for h in (history or [])]

    @classmethod
    def from_json(cls, text: str) -> "Accountant":
        return cls(json.loads(text))

    def to_json(self) -> str:
        return json.dumps(self._rdp.history)

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self._rdp.history)

    def epsilon(self, delta: float) -> float:
        return float(self._rdp.get_epsilon(delta)) if self._rdp.history else 0.0

    def epsilon_after(self, dp: DPPlan, steps: int) -> float:
        """Epsilon if ``steps`` more steps of ``dp`` were taken (nothing is recorded)."""
        return Accountant(self._rdp.history + [(dp.noise_multiplier, dp.sample_rate, steps)]
                          ).epsilon(dp.delta)

    def hook(self, sample_rate: float):
        return self._rdp.get_optimizer_hook_fn(sample_rate=sample_rate)


class BudgetExhausted(RuntimeError):
    """Raised before training when the next round would exceed the client's budget."""


def check_budget(accountant: Accountant, dp: DPPlan, steps: int) -> None:
    if not dp.budget:
        return
    spent, after = accountant.epsilon(dp.delta), accountant.epsilon_after(dp, steps)
    # get_noise_multiplier stops within 0.01 below the target: allow that rounding.
    if after > dp.budget + 1e-6:
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon {spent:.3f} spent, {after:.3f} after "
            f"{steps} more steps > budget {dp.budget:g} (delta {dp.delta:g}); "
            "this client does not train"
        )


# --- the private wrapper around the one loop ----------------------------------------------
class _PenaltyAfterNoiseOptimizer:
    """Mixin for Opacus' DPOptimizer: penalty terms join after the noise.

    Opacus clips and noises per-sample gradients, which only exist for what flows
    through the layers' activations; a penalty on the weights themselves (FedProx's
    proximal term, L2-SP) has no per-sample gradient and would silently be dropped.
    It depends on the public global/pretrained weights only, not on any record, so
    adding its gradient after the noise is post-processing and costs no privacy.
    An empty Poisson batch still takes its step (noise only), as the analysis assumes.
    """

    penalty: Callable[[], torch.Tensor] | None = None
    # The loop weights no micro-batch's loss (common/train.py): Opacus recovers each
    # example's gradient from the micro-batch mean and divides the clipped sum by the
    # expected logical batch itself.
    per_example_clipping = True
    micro_pending = False  # a micro-batch's per-example gradients await clipping

    def step(self, closure=None):
        self.micro_pending = False  # this step (virtual or real) clips them
        ghost = hasattr(self, "accumulate")  # Opacus' fast-gradient-clipping optimizer
        for p in self.params:  # empty batch: no forward ran, nothing to clip
            if ghost and p.grad is None:
                p.grad = torch.zeros_like(p)
            elif not ghost and getattr(p, "grad_sample", None) is None:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        if not self.pre_step():
            return None
        if self.penalty is not None:
            params = self.params
            grads = torch.autograd.grad(self.penalty(), params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = p.grad + g
        return self.original_optimizer.step()


def _dp_optimizer(optimizer, dp: DPPlan, generator: torch.Generator | None, *,
                  ghost: bool = False):
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    base = DPOptimizerFastGradientClipping if ghost else DPOptimizer
    cls = type("PenaltyAfterNoiseDPOptimizer", (_PenaltyAfterNoiseOptimizer, base), {})
    return cls(optimizer, noise_multiplier=dp.noise_multiplier,
               max_grad_norm=dp.max_grad_norm, expected_batch_size=dp.expected_batch_size,
               loss_reduction="mean", generator=generator)


def poisson_batches(examples: list[dict], sample_rate: float, pad_token_id: int,
                    generator: torch.Generator, *,
                    micro_batches: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Each example joins each logical batch independently with probability
    ``sample_rate`` (Opacus' sampler), which DP-SGD's accounting assumes; each logical
    batch comes out as ``micro_batches`` physical ones, in a row.

    The split is Opacus' ``BatchSplittingSampler``'s (``numpy.array_split``, parts
    differing by at most one example), after sorting the draw by length so that each
    part pads less: a reordering within one logical batch, which changes neither the
    clipped sum nor the privacy. Empty parts (a draw smaller than ``micro_batches``)
    come out as zero-row tensors: the objective skips the forward, the optimizer
    still steps at the end of the logical batch, with noise only if all were empty.
    """
    import numpy as np
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    sampler = UniformWithReplacementSampler(num_samples=len(examples),
                                            sample_rate=sample_rate, generator=generator)
    classification = "label" in examples[0]
    while True:
        for indices in sampler:
            ordered = sorted(list(indices), key=lambda i: len(examples[i]["input_ids"]))
            for part in np.array_split(np.array(ordered, dtype=np.int64), micro_batches):
                if len(part):
                    yield collate([examples[i] for i in part.tolist()], pad_token_id)
                else:
                    yield empty_batch(classification=classification)


def empty_batch(*, classification: bool) -> dict[str, torch.Tensor]:
    labels = (torch.zeros((0,), dtype=torch.long) if classification
              else torch.full((0, 1), IGNORE_INDEX, dtype=torch.long))
    return {"input_ids": torch.zeros((0, 1), dtype=torch.long),
            "attention_mask": torch.zeros((0, 1), dtype=torch.long), "labels": labels}


class _MicroBatches:
    """The task loss under DP, one physical micro-batch per call.

    Before a micro-batch that follows another of the same logical batch, Opacus'
    virtual step (``signal_skip_step``, then ``step``) clips the previous one's
    per-example gradients into the running sum ``p.summed_grad`` and ``zero_grad``
    frees them: no noise, no parameter change. The loop's one ``optimizer.step()``
    per logical batch then clips the last micro-batch, adds the noise once, scales
    by the expected logical batch and steps. An empty micro-batch skips the forward.
    """

    def __init__(self, objective, optimizer, ghost_module=None):
        self.objective, self.optimizer, self.ghost_module = objective, optimizer, ghost_module

    def __call__(self, model, batch):
        if self.optimizer.micro_pending:
            self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # keeps summed_grad: step skipped
        if batch["input_ids"].shape[0] == 0:
            return torch.zeros((), requires_grad=True)
        self.optimizer.micro_pending = True
        if self.ghost_module is None:
            return self.objective(model, batch)
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        # Its backward() runs Opacus' two passes: per-example norms, then the clipped sum.
        return DPTensorFastGradientClipping(self.ghost_module, self.optimizer,
                                            self.objective(model, batch), "mean")


@dataclass
class PrivateTraining:
    """What a round's DP-SGD needs beyond the plain loop's arguments."""

    plan: DPPlan
    accountant: Accountant
    examples: list[dict]
    pad_token_id: int
    generator: torch.Generator  # Poisson sampling and noise: reproducible per round
    grad_sample_mode: str = "hooks"  # or "functorch", "ghost" (config 'dp-grad-sample-mode')


@contextmanager
def private_training(model: torch.nn.Module, optimizer, objective, private: PrivateTraining):
    """Yields (DP optimizer, objective, Poisson batches) for the loop; hooks off after."""
    from opacus import GradSampleModule

    task_loss = getattr(objective, "task_loss", objective)
    penalties = list(getattr(objective, "penalties", []))
    # Hooks on the trainable (LoRA) layers. The loop keeps calling `model` itself: the
    # hooks live on its submodules, and peft's methods (disable_adapter for a 'base'
    # teacher) stay reachable. The model is never moved after wrapping (the class of
    # bug in opacus issue 820); tests/test_dp.py checks zero noise equals plain SGD.
    ghost = private.grad_sample_mode == "ghost"
    if ghost:
        # Ghost clipping (Li et al., 2022; Opacus >= 1.5): per-example gradient norms
        # from activations and backprops, never the per-example gradients; it needs the
        # loss of each example, so the task loss is swapped for its per-example form.
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        from common.objectives import per_example_losses

        task_loss = per_example_losses(task_loss)
        if task_loss is None:
            raise ValueError("dp-grad-sample-mode ghost needs a loss per example: this "
                             "objective has none; use hooks")
        wrapped = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean",
            max_grad_norm=private.plan.max_grad_norm, use_ghost_clipping=True)
    else:
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                                   force_functorch=private.grad_sample_mode == "functorch")
    # The noise is drawn where the parameters live; Poisson sampling stays on the CPU.
    device = next(p for p in model.parameters() if p.requires_grad).device
    noise = torch.Generator(device=device).manual_seed(private.generator.initial_seed() + 1)
    dp_optimizer = _dp_optimizer(optimizer, private.plan, noise, ghost=ghost)
    dp_optimizer.attach_step_hook(private.accountant.hook(private.plan.sample_rate))
    if penalties:
        dp_optimizer.penalty = lambda: sum(term(model) for term in penalties)
    batches = poisson_batches(private.examples, private.plan.sample_rate,
                              private.pad_token_id, private.generator,
                              micro_batches=private.plan.micro_batches)
    try:
        with warnings.catch_warnings():
            # Opacus' hooks on LoRA layers whose inputs need no grad: expected, and
            # otherwise printed at every step (torch's full-backward-hook notice).
            warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                    category=UserWarning)
            yield dp_optimizer, _MicroBatches(task_loss, dp_optimizer,
                                              wrapped if ghost else None), batches
    finally:
        wrapped._close()  # removes the hooks and the per-sample gradients
        for p in model.parameters():
            for attr in ("grad_sample", "summed_grad", "_processed", "_norm_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)


def sigma_for_epsilon_per_release(epsilon: float, delta: float) -> float:
    """The Gaussian mechanism's classic calibration (Dwork & Roth, Thm 3.22), which
    Flower's LocalDpMod uses: std = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon."""
    return math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float,
                     sample_rate: float = 1.0) -> float:
    """Epsilon of ``releases`` Gaussian releases at this noise, by Opacus' RDP accountant."""
    if releases <= 0 or noise_multiplier <= 0:
        return 0.0 if releases <= 0 else math.inf
    return Accountant([(noise_multiplier, sample_rate, releases)]).epsilon(delta)


def noise_for_releases(epsilon: float, releases: int, delta: float) -> float:
    """The noise multiplier z (noise std / sensitivity) at which ``releases`` Gaussian
    releases without subsampling spend at most ``epsilon`` at ``delta``: the inverse of
    :func:`gaussian_epsilon`, for client-level DP, where each round is one release at
    the configured 'client-dp-noise-multiplier' (``server/privacy.py`` says why no
    amplification by subsampling is claimed). Opacus' ``get_noise_multiplier`` (RDP
    accountant, sample rate 1) bisects it, to within 0.01 of ``epsilon``.

    Raises ValueError for an epsilon or delta out of range or fewer than one release.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if (not epsilon > 0 or not 0 < delta < 1 or isinstance(releases, bool)
            or int(releases) != releases or releases < 1):
        raise ValueError(f"noise_for_releases needs epsilon > 0, a whole number of releases "
                         f">= 1 and 0 < delta < 1, got epsilon {epsilon}, releases {releases}, "
                         f"delta {delta}")
    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=1.0, steps=int(releases), accountant="rdp"))
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise ValueError(f"no noise multiplier spends only epsilon {epsilon:g} at delta "
                         f"{delta:g} over {releases} releases ({err}): raise epsilon or "
                         "release fewer times") from None


# The error code of a train reply refused for the budget (Flower's own codes are < 100).
DP_REFUSAL_CODE = 4001
