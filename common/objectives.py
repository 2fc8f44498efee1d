"""Loss terms that plug into the one training loop.

An objective maps (model, batch) to a scalar loss. Algorithms differ only here:
plain fine-tuning is the task loss; FedProx adds a proximal term, L2-SP a penalty
toward the pretrained weights, distillation swaps the task loss for a teacher-guided
one. The loop in ``common/train.py`` never changes.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from common.data import IGNORE_INDEX


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


# --- logits over response positions --------------------------------------------------
def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t (shape (P,), int64) whose logits predict a labelled token
    ``labels[:, t + 1]`` in at least one row of the (batch, seq) ``labels``.

    Any padding side and any prompt length: the union over the batch, never the whole
    sequence unless every position predicts a label somewhere. With no labelled token
    at all, the last position (its label is ignored: the loss terms are 0)."""
    positions = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if positions.numel() == 0:
        positions = torch.tensor([labels.shape[1] - 2], device=labels.device)
    return positions


def response_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (batch, P, vocab) at the positions that predict a labelled token, and
    those labels (batch, P), per :func:`response_positions`.

    transformers' ``logits_to_keep`` given as an index tensor runs the LM head over those
    positions only: the prompt is most of each sequence here and the 49k-word head a
    large share of a small model's compute. A tensor, not a trailing count, because
    the gathered hidden states are contiguous: a sliced (strided) view made the bf16
    head's matmul copy the whole weight per batch row (torch profiler, 2.4 s a step).
    """
    labels = batch["labels"]
    positions = response_positions(labels)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=positions)
    return out.logits, labels[:, positions + 1]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood, 0 where the label is ignored."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(labels.shape)


def per_sample_mean(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's labelled tokens, then over sequences.

    Each example weighs the same whatever its length (unlike Hugging Face's mean over
    all tokens of the batch), which DP-SGD's per-sample clipping also needs.
    """
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    has_tokens = counts > 0
    return (per_token.sum(dim=1)[has_tokens] / counts[has_tokens]).mean()


# --- task losses ---------------------------------------------------------------------
def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on response tokens, per-sample mean."""
    logits, labels = response_logits(model, batch)
    return per_sample_mean(token_nll(logits, labels), labels)


def classification_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the sequence label (one per example: already per-sample)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"])


def per_example_losses(task: Objective):
    """The per-example loss vector (batch,) of a task loss, which Opacus' ghost
    clipping needs, or None where there is none (distillation)."""
    if task is causal_lm_loss:
        def causal_lm_losses(model, batch):
            logits, labels = response_logits(model, batch)
            counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
            return token_nll(logits, labels).sum(dim=1) / counts
        return causal_lm_losses
    if task is classification_loss:
        def classification_losses(model, batch):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return classification_losses
    return None


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Per-token KL(teacher || student) of the temperature-softened distributions."""
    return distillation_divergence(student_logits, teacher_logits, temperature, "forward-kl")


def distillation_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float, loss: str = "forward-kl",
                            beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence of the temperature-softened distributions, shape (batch, seq).

    ``student_logits``, ``teacher_logits``: (batch, seq, vocab). ``loss``:
    - ``forward-kl``: KL(p_T || p_S), mass-covering (Hinton et al., 2015);
    - ``reverse-kl``: KL(p_S || p_T), mode-seeking (MiniLLM, Gu et al., 2024);
    - ``jsd``: generalized JSD of GKD (Agarwal et al., 2024, Eq. 1),
      beta * KL(p_T || M) + (1 - beta) * KL(p_S || M) with M = beta p_T + (1 - beta) p_S.
    Written after TRL's ``GKDTrainer.generalized_jsd_loss`` (trl/trainer/gkd_trainer.py,
    same F.kl_div and logsumexp mixture), per token and unreduced so that the caller
    masks prompts and takes the per-sample mean; TRL is not a dependency for these lines.
    Raises ``ValueError`` for another ``loss`` or a beta outside (0, 1) with jsd.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # F.kl_div(input, target, log_target=True) = sum target.exp() * (target - input): KL(target || input)
    if loss == "forward-kl":
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)
    elif loss == "reverse-kl":
        kl = F.kl_div(log_p_t, log_p_s, reduction="none", log_target=True)
    elif loss == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"config 'distill-beta' must be in (0, 1) for jsd, got {beta}")
        log_m = torch.logsumexp(torch.stack([log_p_s + math.log(1 - beta),
                                             log_p_t + math.log(beta)]), dim=0)
        kl = (beta * F.kl_div(log_m, log_p_t, reduction="none", log_target=True)
              + (1 - beta) * F.kl_div(log_m, log_p_s, reduction="none", log_target=True))
    else:
        raise ValueError(f"config 'distill-loss' must be forward-kl, reverse-kl or jsd; got {loss!r}")
    return kl.sum(dim=-1)


@dataclass
class DistillationLoss:
    """alpha * CE(labels) + (1 - alpha) * T^2 * D(teacher, student), response tokens.

    ``D`` is ``loss`` (:func:`distillation_divergence`). ``teacher`` is a frozen causal
    LM, or None to use the student's own base model with the adapter switched off
    (peft's ``disable_adapter``): no second copy of the weights. The teacher's logits
    are computed once per batch, without gradients. T^2 keeps the soft-target
    gradients on the scale of the CE's (Hinton et al., 2015).
    """

    alpha: float
    temperature: float
    teacher: torch.nn.Module | None = None
    loss: str = "forward-kl"
    beta: float = 0.5

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        student_logits, labels = response_logits(model, batch)
        with torch.no_grad():
            context = model.disable_adapter() if self.teacher is None else nullcontext()
            with context:
                teacher_logits, _ = response_logits(self.teacher or model, batch)
        mask = labels != IGNORE_INDEX
        divergence = distillation_divergence(student_logits, teacher_logits, self.temperature,
                                             self.loss, self.beta) * mask
        ce = token_nll(student_logits, labels)
        soft = per_sample_mean(divergence, labels)
        return self.alpha * per_sample_mean(ce, labels) + (1 - self.alpha) * self.temperature ** 2 * soft


# --- penalty terms -------------------------------------------------------------------
@dataclass
class ProximalTerm:
    """FedProx: (mu/2) * ||w - w_global||^2 over the trainable (adapter) weights.

    Flower's FedProx strategy only sends ``proximal-mu``; the client must add this.
    """

    mu: float
    anchor: dict[str, torch.Tensor]

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for name, param in model.named_parameters():
            if param.requires_grad:
                total = total + (param - self.anchor[name]).pow(2).sum()
        return 0.5 * self.mu * total


@dataclass
class L2SPTerm:
    """L2-SP for LoRA: weight * sum over layers of ||scale * B @ A||_F^2.

    The adapted weight is W0 + scale*B@A, so this is exactly L2-SP's squared distance
    from the pretrained (starting point) weights W0, measured in function space. We do
    not penalize A and B against their initial values instead: A starts random, so that
    would pull toward an arbitrary point and depend on the parametrization.
    ||BA||_F^2 = sum((B^T B) * (A A^T)) costs O(r^2 (m+n)), never forming the m x n delta.
    """

    weight: float

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        return self.weight * lora_delta_sq_norm(model)


def lora_delta_sq_norm(model: torch.nn.Module) -> torch.Tensor:
    from peft.tuners.lora import LoraLayer

    total = torch.zeros(())
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a = module.lora_A[name].weight  # (r, in)
            b = module.lora_B[name].weight  # (out, r)
            scale = module.scaling[name]
            total = total + scale ** 2 * ((b.T @ b) * (a @ a.T)).sum()
    return total


# --- composition ---------------------------------------------------------------------
@dataclass
class TrainObjective:
    """Task loss plus penalty terms; the loop calls this and nothing else."""

    task_loss: Objective = causal_lm_loss
    penalties: list[Callable[[torch.nn.Module], torch.Tensor]] = field(default_factory=list)

    def __call__(self, model, batch) -> torch.Tensor:
        loss = self.task_loss(model, batch)
        for penalty in self.penalties:
            loss = loss + penalty(model)
        return loss


def snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def build_objective(model, cfg=None, *, proximal_mu: float = 0.0) -> TrainObjective:
    """The objective for this round; call it after the global adapter is loaded.

    ``cfg`` (a RunConfig) switches on L2-SP and distillation; ``proximal_mu`` comes
    from the strategy's round config (FedProx).
    """
    classify = cfg is not None and cfg.task == "classification"
    task: Objective = classification_loss if classify else causal_lm_loss
    penalties: list = []
    if proximal_mu > 0:
        penalties.append(ProximalTerm(proximal_mu, snapshot_trainable(model)))
    if cfg is not None and cfg.l2sp_weight > 0:
        penalties.append(L2SPTerm(cfg.l2sp_weight))
    if cfg is not None and cfg.distill_teacher:
        from common.student import load_teacher

        # 'base' is the student's own weights without the adapter, unless the student
        # is a cut-down model: then the full base model is loaded as the teacher
        own_base = cfg.distill_teacher == "base" and not cfg.student_layers
        teacher = None if own_base else load_teacher(cfg)
        task = DistillationLoss(cfg.distill_alpha, cfg.distill_temperature, teacher,
                                loss=cfg.distill_loss, beta=cfg.distill_beta)
    return TrainObjective(task_loss=task, penalties=penalties)
