"""The mean of LoRA updates, exactly or at rank r, and how far naive averaging is off.

Averaging the factors separately (FedAvg on the adapter tensors) gives mean(B) mean(A),
not the mean of the clients' updates mean(B_i A_i) (FedEx-LoRA, Singhal et al., 2024,
arXiv 2410.09432). This module measures that gap and computes the two fixes
``lora-aggregation`` offers, never forming a d x k matrix:

- ``exact`` (FedEx-LoRA): the adapter is the naive mean (B̄, Ā) and the residual
  mean(B_i A_i) - B̄ Ā goes into the frozen weights. Here the residual is kept as
  factors P (d x m), Q (m x k): with weights w_i summing to 1 it equals
  sum_i w_i (B_i - B̄)(A_i - Ā), of rank <= (n - 1) r per round.
- ``alternating`` (RoLoRA, Chen et al., 2024, arXiv 2409.02346): the clients train only
  B in odd rounds and only A in even rounds, the other factor frozen at the global value
  every client received. Then mean(B_i) A = mean(B_i A) exactly (and B mean(A_i) =
  mean(B A_i)): the per-tensor mean is the mean of the updates, at rank r and naive's
  bytes, the cost being that each round moves only one factor.
- ``svd``: the best rank-r approximation of mean(B_i A_i) (Eckart-Young), as factors,
  from a QR of the stacked factors: O((d + k)(n r)^2), not the O(d k min(d, k)) SVD of the
  dense mean (the same route as FLoRA's stacking, arXiv 2409.05976, and FlexLoRA's SVD
  redistribution, arXiv 2402.11505).

Heterogeneous ranks (``client-lora-ranks``, node-config ``lora-r``): a client truncates
the SVD-ordered global factors to its rank and pads its reply back to the global shapes
(:func:`truncate_to_rank`, :func:`pad_to_rank`), so ``svd`` aggregates mixed ranks exactly.
The exact mode's residual enters a model through :func:`set_residual` (forward hooks).

Everything is computed in float64 and returned in float32. Written here rather than taken
from a library: peft and Flower aggregate tensors one by one and have no low-rank mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from common.config import LORA_AGGREGATIONS

LORA_RESIDUAL_KEY = "lora-residual"  # train messages: the exact mode's residual factors
TRAIN_FACTOR_KEY = "lora-train-factor"  # train config: the factor clients train (alternating)
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
RESIDUAL_P, RESIDUAL_Q = ".residual_P", ".residual_Q"  # keys of the residual factors
RESIDUAL_FILE = "fedtune_residual.safetensors"  # beside adapter_model.safetensors


@dataclass(frozen=True)
class LayerResult:
    """One adapted layer's aggregate. ``naive_error``: ||M - B̄Ā||_F / ||M||_F with
    M = sum_i w_i B_i A_i; ``applied_error``: the same for what the mode applied (naive:
    naive_error; exact: the float-level rank drop; svd: the truncation error)."""

    b: torch.Tensor  # d x r, the global B
    a: torch.Tensor  # r x k, the global A
    naive_error: float
    applied_error: float
    residual: tuple[torch.Tensor, torch.Tensor] | None = None  # exact: (P d x m, Q m x k)


def lora_rank(state: Mapping) -> int:
    """The LoRA rank of an adapter (tensors or Flower Arrays by name): the rows of its
    first A matrix; 0 without one (e.g. FFA-LoRA's wire state)."""
    return next((int(v.shape[0]) for k, v in state.items() if k.endswith(A_SUFFIX)), 0)


def lora_pairs(keys) -> list[str]:
    """The layer prefixes ``X`` with both ``X.lora_A.weight`` and ``X.lora_B.weight``."""
    keys = set(keys)
    return sorted(k[: -len(A_SUFFIX)] for k in keys
                  if k.endswith(A_SUFFIX) and k[: -len(A_SUFFIX)] + B_SUFFIX in keys)


def normalized_weights(weights: Sequence[float]) -> torch.Tensor:
    """FedAvg weights (e.g. example counts) as float64 summing to 1.

    Raises ValueError on an empty list, a negative weight or a zero total."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if w.numel() == 0 or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"aggregation weights must be >= 0 with a positive sum; got {list(weights)}")
    return w / w.sum()


def lowrank_sq_norm(x: torch.Tensor, y: torch.Tensor) -> float:
    """||X Y||_F^2 for X (d x m), Y (m x k) as trace((X^T X)(Y Y^T)): two m x m Gram
    matrices, O((d + k) m^2), no d x k product."""
    x, y = x.double(), y.double()
    return float(torch.sum((x.T @ x) * (y @ y.T)))  # trace(G H) = sum(G * H^T), H symmetric


def _ratio(num_sq: float, den_sq: float) -> float:
    if den_sq <= 0.0:
        return 0.0 if num_sq <= 0.0 else math.inf
    return math.sqrt(max(num_sq, 0.0) / den_sq)


def _stacks(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], w: torch.Tensor):
    """(B̄, Ā, X, Y) with X = [w_1 B_1 .. w_n B_n] (d x nr), Y = [A_1; ..; A_n] (nr x k),
    so M = X Y = sum_i w_i B_i A_i."""
    b = torch.stack([t.double() for t in bs])  # n x d x r
    a = torch.stack([t.double() for t in as_])  # n x r x k
    b_mean, a_mean = torch.einsum("n,ndr->dr", w, b), torch.einsum("n,nrk->rk", w, a)
    x = torch.cat(list(w[:, None, None] * b), dim=1)
    y = torch.cat(list(a), dim=0)
    return b, a, b_mean, a_mean, x, y


def naive_error(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor],
                weights: Sequence[float]) -> float:
    """Relative error of naive averaging for one layer,
    ||sum_i w_i B_i A_i - B̄ Ā||_F / ||sum_i w_i B_i A_i||_F (B_i d x r, A_i r x k).

    The difference is computed as sum_i w_i (B_i - B̄)(A_i - Ā), which equals it when the
    weights sum to 1 and does not cancel catastrophically when the clients agree."""
    w = normalized_weights(weights)
    b, a, b_mean, a_mean, x, y = _stacks(bs, as_, w)
    dx = torch.cat(list(w[:, None, None] * (b - b_mean)), dim=1)
    dy = torch.cat(list(a - a_mean), dim=0)
    return _ratio(lowrank_sq_norm(dx, dy), lowrank_sq_norm(x, y))


def lowrank_svd(x: torch.Tensor, y: torch.Tensor):
    """Thin SVD of X Y (X d x m, Y m x k) without forming it: X = Q_x R_x, Y^T = Q_y R_y,
    then the SVD of the m x m core R_x R_y^T. Returns U (d x m), S (m,), V (k x m),
    float64, singular values descending. Cost O((d + k) m^2 + m^3)."""
    qx, rx = torch.linalg.qr(x.double())
    qy, ry = torch.linalg.qr(y.double().T)
    u, s, vh = torch.linalg.svd(rx @ ry.T)
    return qx @ u, s, qy @ vh.T


ALIGN_MAX_CONDITION = 1e4  # above it the aligned gauge would blow B up: keep the SVD's


def svd_aggregate(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor],
                  weights: Sequence[float], *, rank: int | None = None,
                  align: bool = False) -> LayerResult:
    """The best rank-r factors of M = sum_i w_i B_i A_i (truncated SVD via QR).

    The product B'A' = U_r S_r V_r^T is fixed; the split between the factors (the gauge:
    B'G, G^-1 A' for any invertible r x r G) is not, and it is what the clients continue
    training from. Without ``align``: B' = U_r S_r / c, A' = c V_r^T with
    c = ||Ā||_F / sqrt(r), so A' keeps the naive mean's norm and its rows are ordered by
    singular value. With ``align`` (what the server applies; ``truncate_to_rank`` puts
    the factors back in singular-value order for a lower-rank client): A' = T V_r^T with
    T = Ā V_r, i.e. Ā projected onto M's top-r row space, and B' = U_r S_r T^-1, so the
    factors stay next to the naive means (B̄, Ā) that the clients' optimisers were
    moving, and only the product is corrected (falls back to the first gauge when T's
    condition number exceeds ``ALIGN_MAX_CONDITION``). Hand-written, as the rest of this
    module. ``applied_error`` is the truncation error sqrt(sum_{j>r} s_j^2) / ||M||_F."""
    w = normalized_weights(weights)
    r = rank or bs[0].shape[1]
    _, _, b_mean, a_mean, x, y = _stacks(bs, as_, w)
    u, s, v = lowrank_svd(x, y)
    total, kept = float(torch.sum(s * s)), float(torch.sum(s[:r] ** 2))
    c = float(torch.linalg.norm(a_mean)) / math.sqrt(r) or 1.0
    b_new = u[:, :r] * (s[:r] / c)
    a_new = c * v[:, :r].T
    if align and v.shape[1] >= r:
        t = a_mean @ v[:, :r]  # r x r
        if float(torch.linalg.cond(t)) < ALIGN_MAX_CONDITION:
            a_new = t @ v[:, :r].T
            b_new = torch.linalg.solve(t.T, (u[:, :r] * s[:r]).T).T  # U_r S_r T^-1
    err = naive_error(bs, as_, weights)
    return LayerResult(b=b_new.float(), a=a_new.float(), naive_error=err,
                       applied_error=_ratio(total - kept, total))


def compress(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(P, Q, dropped) with P Q = X Y up to float: the thin SVD of X Y with singular
    values under numpy's matrix_rank tolerance (max(d, k) * eps32 * s_max) dropped, as
    P = U S (d x m'), Q = V^T (m' x k). ``dropped``: sqrt of the dropped s^2, absolute."""
    u, s, v = lowrank_svd(x, y)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return x.new_zeros(x.shape[0], 0).float(), y.new_zeros(0, y.shape[1]).float(), 0.0
    tol = max(x.shape[0], y.shape[1]) * torch.finfo(torch.float32).eps * float(s[0])
    keep = int((s > tol).sum())
    dropped = math.sqrt(float(torch.sum(s[keep:] ** 2)))
    return (u[:, :keep] * s[:keep]).float(), v[:, :keep].T.contiguous().float(), dropped


def exact_aggregate(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor],
                    weights: Sequence[float],
                    residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> LayerResult:
    """FedEx-LoRA for one layer: the adapter (B̄, Ā) plus the cumulative residual
    (P, Q) with P Q = previous P Q + sum_i w_i B_i A_i - B̄ Ā (float tolerance).

    ``residual``: the previous round's (P d x m, Q m x k), or None for none yet.
    ``applied_error``: the rank drop of :func:`compress`, relative to ||M||_F."""
    w = normalized_weights(weights)
    b, a, b_mean, a_mean, x, y = _stacks(bs, as_, w)
    dx = torch.cat(list(w[:, None, None] * (b - b_mean)), dim=1)
    dy = torch.cat(list(a - a_mean), dim=0)
    if residual is not None and residual[0].shape[1]:
        dx = torch.cat([residual[0].double(), dx], dim=1)
        dy = torch.cat([residual[1].double(), dy], dim=0)
    p, q, dropped = compress(dx, dy)
    m_sq = lowrank_sq_norm(x, y)
    return LayerResult(b=b_mean.float(), a=a_mean.float(),
                       naive_error=naive_error(bs, as_, weights),
                       applied_error=_ratio(dropped ** 2, m_sq), residual=(p, q))


def trained_factor(server_round: int) -> str:
    """``alternating``: the LoRA factor the clients train in ``server_round`` (1-based):
    'B' in odd rounds, 'A' in even ones. B first because peft starts B at 0, where A's
    gradient (proportional to B) is 0: a first round on A alone would not move."""
    return "B" if server_round % 2 == 1 else "A"


def set_trained_factor(model, factor: str | None) -> None:
    """Make only LoRA's ``factor`` ('A' or 'B') matrices trainable, or with None both
    (A stays frozen under FFA-LoRA). Other trainable weights (a classifier head) are left
    as they are. The cached model is shared by simulated clients: call it every round.
    Raises ValueError for another factor name."""
    if factor not in (None, "A", "B"):
        raise ValueError(f"LoRA factor must be 'A' or 'B'; got {factor!r}")
    ffa = getattr(model, "fedtune_ffa", False)
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(factor in (None, "A") and not ffa)
        elif ".lora_B." in name:
            param.requires_grad_(factor in (None, "B"))


def aggregate_lora(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *,
                   mode: str, residual: Mapping[str, torch.Tensor] | None = None,
                   sent: Mapping[str, torch.Tensor] | None = None, factor: str = "B",
                   align: bool = False):
    """Aggregate the LoRA pairs of the clients' adapter states under ``mode``.

    Returns (arrays, residual, stats): ``arrays`` the new global B and A per layer (the
    other tensors, e.g. a classifier head, are left to the caller's mean); ``residual``
    the new cumulative residual factors by key (``exact`` only, else empty); ``stats``
    the per-round summary 'agg-error-mean'/'-max' (naive averaging's relative error over
    the layers) and 'applied-error-mean'/'-max' (the applied aggregate's), plus for
    exact 'residual-rank-max'. ``alternating``: ``sent`` is the global adapter the clients
    received and ``factor`` the one they trained; the frozen factor is taken from
    ``sent`` (not from the replies, which hold the same values unless a client broke the
    protocol) and the trained one is the weighted mean. Raises ValueError for an unknown
    mode or, in alternating mode, without ``sent``."""
    if mode not in LORA_AGGREGATIONS:
        raise ValueError(f"lora-aggregation must be one of {', '.join(LORA_AGGREGATIONS)}; got {mode!r}")
    residual = residual or {}
    arrays: dict[str, torch.Tensor] = {}
    new_residual: dict[str, torch.Tensor] = {}
    naive, applied, ranks = [], [], []
    for layer in lora_pairs(states[0]):
        bs = [s[layer + B_SUFFIX] for s in states]
        as_ = [s[layer + A_SUFFIX] for s in states]
        if mode == "alternating":
            if sent is None:
                raise ValueError("lora-aggregation alternating needs the adapter sent")
            # the error of the replies as they came: ~0 when every client kept the
            # frozen factor (a check on the clients); the aggregate uses the sent one
            naive.append(naive_error(bs, as_, weights))
            applied.append(naive[-1])
            frozen = layer + (A_SUFFIX if factor == "B" else B_SUFFIX)
            if factor == "B":
                as_ = [sent[frozen].to(as_[0].dtype)] * len(as_)
            else:
                bs = [sent[frozen].to(bs[0].dtype)] * len(bs)
            _, _, b_mean, a_mean, _, _ = _stacks(bs, as_, normalized_weights(weights))
            arrays[layer + B_SUFFIX], arrays[layer + A_SUFFIX] = b_mean.float(), a_mean.float()
            arrays[frozen] = sent[frozen].float()
            continue
        if mode == "naive":
            err = naive_error(bs, as_, weights)
            naive.append(err)
            applied.append(err)
            continue
        if mode == "svd":
            result = svd_aggregate(bs, as_, weights, align=align)
        else:
            prev = (residual[layer + RESIDUAL_P], residual[layer + RESIDUAL_Q]) \
                if layer + RESIDUAL_P in residual else None
            result = exact_aggregate(bs, as_, weights, prev)
            new_residual[layer + RESIDUAL_P], new_residual[layer + RESIDUAL_Q] = result.residual
            ranks.append(result.residual[0].shape[1])
        arrays[layer + B_SUFFIX], arrays[layer + A_SUFFIX] = result.b, result.a
        naive.append(result.naive_error)
        applied.append(result.applied_error)
    stats = {}
    if naive:
        stats = {"agg-error-mean": sum(naive) / len(naive), "agg-error-max": max(naive),
                 "applied-error-mean": sum(applied) / len(applied),
                 "applied-error-max": max(applied)}
    if mode == "exact":
        stats["residual-rank-max"] = max(ranks, default=0)
    return arrays, new_residual, stats


# --- heterogeneous ranks: a client trains rank r <= the global rank R --------------------
def truncate_to_rank(state: Mapping[str, torch.Tensor], *, rank: int,
                     global_rank: int) -> dict[str, torch.Tensor]:
    """The client's rank-``rank`` adapter from the global rank-R one: the first r columns
    of B and rows of A. A client at rank r trains with lora-alpha * r / R, so its
    scaling alpha_r / r equals the global alpha / R: its update is the global's first r
    components, and its steps move the product as fast as a rank-R client's (with one
    alpha for all ranks, a rank-r client's Adam steps would move it R / r times faster).
    The global factors are first put in singular-value order (B = U S / c, A = c V^T,
    c = ||A||_F / sqrt(R), the same product), so the first r components are the best
    rank-r approximation of the global update (Eckart-Young; FlexLoRA's redistribution,
    arXiv 2402.11505) whatever gauge the server's aggregate came in (svd aligns it with
    the naive means; another mode's, or a resumed run's, is in no particular order).
    Other tensors pass through. Raises ValueError unless 1 <= rank <= global_rank."""
    _check_ranks(rank, global_rank)
    out = dict(state)
    for layer in lora_pairs(state):
        b, a = state[layer + B_SUFFIX], state[layer + A_SUFFIX]
        u, s, v = lowrank_svd(b, a)
        c = float(torch.linalg.norm(a.double())) / math.sqrt(global_rank) or 1.0
        out[layer + B_SUFFIX] = (u[:, :rank] * (s[:rank] / c)).to(b.dtype)
        out[layer + A_SUFFIX] = (c * v[:, :rank].T).contiguous().to(a.dtype)
    return out


def pad_to_rank(state: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], *,
                rank: int, global_rank: int) -> dict[str, torch.Tensor]:
    """The inverse, for a rank-r reply: B = [B_r, sent B's other columns], A = [A_r; 0],
    so B A = B_r A_r (the same scaling alpha / R applies to both), in the global shapes."""
    _check_ranks(rank, global_rank)
    out = dict(state)
    for layer in lora_pairs(state):
        b, a = state[layer + B_SUFFIX], state[layer + A_SUFFIX]
        out[layer + B_SUFFIX] = torch.cat([b, sent[layer + B_SUFFIX][:, rank:].to(b.dtype)], dim=1)
        out[layer + A_SUFFIX] = torch.cat([a, a.new_zeros(global_rank - rank, a.shape[1])])
    return out


def _check_ranks(rank: int, global_rank: int) -> None:
    if not 1 <= rank <= global_rank:
        raise ValueError(f"client LoRA rank {rank} must be in [1, lora-r {global_rank}]: set "
                         "node-config 'lora-r' (or 'client-lora-ranks') to at most lora-r")


# --- the residual inside a model: frozen extra path, y += scaling * (x Q^T) P^T -------
def _lora_module(model, layer: str):
    try:
        return model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"residual layer '{layer}' is not in the model: was it trained with "
                         "the same model and LoRA target modules?") from None


def _residual_hook(module, inputs, output):
    if getattr(module, "fedtune_residual", None) is None:
        return output
    p, q = module.fedtune_residual
    x = inputs[0].to(p.dtype)
    return output + (module.fedtune_residual_scaling * ((x @ q.T) @ p.T)).to(output.dtype)


def set_residual(model, residual: Mapping[str, torch.Tensor]) -> None:
    """Install the FedEx-LoRA residual (keys ``<layer>.residual_P/Q``) into a peft model:
    each adapted layer's frozen base output gains scaling * P Q x, as if P Q had been
    added to its weight, without modifying (or copying) the base weights, so clients that
    share one cached model switch residuals exactly. An empty mapping removes them all.

    A forward hook rather than a second peft adapter: peft fixes an adapter's rank per
    layer pattern, and this rank changes every round. Raises ValueError for an unknown layer."""
    for module in model.modules():
        if getattr(module, "fedtune_residual_handle", None) is not None:
            module.fedtune_residual = None
    for layer in sorted(k[: -len(RESIDUAL_P)] for k in residual if k.endswith(RESIDUAL_P)):
        lora = _lora_module(model, layer)
        base = lora.get_base_layer()
        device = base.weight.device
        base.fedtune_residual = (residual[layer + RESIDUAL_P].to(device, torch.float32),
                                 residual[layer + RESIDUAL_Q].to(device, torch.float32))
        base.fedtune_residual_scaling = float(lora.scaling["default"])
        if getattr(base, "fedtune_residual_handle", None) is None:
            base.fedtune_residual_handle = base.register_forward_hook(_residual_hook)


def get_residual(model) -> dict[str, torch.Tensor]:
    """The installed residual factors by key (empty: none)."""
    out = {}
    for name, module in model.named_modules():
        res = getattr(module, "fedtune_residual", None)
        if res is not None and name.endswith(".base_layer"):
            layer = name[: -len(".base_layer")]
            out[layer + RESIDUAL_P], out[layer + RESIDUAL_Q] = res[0].cpu(), res[1].cpu()
    return out


def fold_residual(model) -> int:
    """Add scaling * P Q to each base weight that carries a residual and remove the
    hooks (before ``merge_and_unload`` for export). Returns the number of layers folded."""
    folded = 0
    for module in model.modules():
        handle = getattr(module, "fedtune_residual_handle", None)
        if handle is None:
            continue
        if getattr(module, "fedtune_residual", None) is not None:
            p, q = module.fedtune_residual
            with torch.no_grad():
                module.weight += (module.fedtune_residual_scaling * (p @ q)).to(module.weight.dtype)
            folded += 1
        handle.remove()
        module.fedtune_residual = module.fedtune_residual_handle = None
    return folded


def save_residual(model, folder) -> None:
    """Write the installed residual beside a saved adapter (nothing when there is none)."""
    residual = get_residual(model)
    if residual:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in residual.items()}, str(folder) + "/" + RESIDUAL_FILE)


def load_residual(folder) -> dict[str, torch.Tensor]:
    """The residual saved beside an adapter in ``folder`` (empty: none there)."""
    from pathlib import Path

    path = Path(folder) / RESIDUAL_FILE
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))
