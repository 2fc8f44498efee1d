"""DP-SGD with large logical batches (common/dp.py): a Poisson logical batch split into
grad-accum micro-batches is one clipped sum, one noise draw of std sigma*C/B and one
accountant step at the logical rate; and the DP recipe (common/config.py)."""

import pytest
import torch
from opacus.accountants import RDPAccountant

import common.train as train
from common.config import RunConfig
from common.dp import (
    Accountant, DPPlan, PrivateTraining, describe_plan, plan, poisson_batches,
)
from common.model import adapter_state, get_model, set_adapter_state
from common.objectives import build_objective
from tests.test_dp import _examples


def _sgd(monkeypatch):
    """Plain SGD at lr 1 under the DP optimizer: the update is minus the DP gradient."""
    monkeypatch.setattr(train, "make_optimizer", lambda m, c: torch.optim.SGD(
        [p for p in m.parameters() if p.requires_grad], lr=1.0))


def _private(examples, pad, *, micro, expected, noise=0.0, clip=1e9, seed=0, accountant=None):
    rate = min(1.0, expected / len(examples))
    dp = DPPlan(noise_multiplier=noise, sample_rate=rate, expected_batch_size=expected,
                max_grad_norm=clip, delta=1e-5, budget=0.0, planned_steps=10, micro_batches=micro)
    return PrivateTraining(dp, accountant or Accountant(), examples, pad,
                           torch.Generator().manual_seed(seed))


def _dp_gradient(model, cfg, start, private, steps=1):
    """The DP gradient of ``steps`` steps (lr 1 SGD: start - end), one flat vector."""
    set_adapter_state(model, start)
    train.train_steps(model, None, build_objective(model, cfg), cfg, num_steps=steps,
                      private=private)
    end = adapter_state(model)
    return torch.cat([(start[k] - end[k]).flatten() for k in start])


def _cfg(tiny_cfg, micro):
    return tiny_cfg.replace(lora_dropout=0.0, max_grad_norm=0.0, lr=1.0, weight_decay=0.0,
                            lr_schedule="constant", batch_size=2, grad_accum=micro)


def test_logical_batch_in_micro_batches_equals_one_physical_batch(tiny_cfg, tokenizer,
                                                                  monkeypatch):
    """Noise off, sampling rate 1 (the logical batch is every example): 4 micro-batches
    of 2 give the same clipped sum, divided by the same B, as one batch of 8."""
    _sgd(monkeypatch)
    pad, examples = tokenizer.pad_token_id, _examples(tokenizer, n=8)
    model = get_model(_cfg(tiny_cfg, 1))
    torch.manual_seed(3)
    start = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_state(model).items()}
    whole_unclipped = _dp_gradient(model, _cfg(tiny_cfg, 1), start,
                                   _private(examples, pad, micro=1, expected=8))
    # a clip that bites: the mean of 8 clipped gradients is well below the plain mean
    clip = 0.3 * float(whole_unclipped.norm())
    whole = _dp_gradient(model, _cfg(tiny_cfg, 1), start,
                         _private(examples, pad, micro=1, expected=8, clip=clip))
    split = _dp_gradient(model, _cfg(tiny_cfg, 4), start,
                         _private(examples, pad, micro=4, expected=8, clip=clip))
    assert float(whole.norm()) < 0.9 * float(whole_unclipped.norm())  # clipping acted
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-7)


def test_micro_batches_split_each_poisson_draw_into_grad_accum_parts(tokenizer):
    examples = _examples(tokenizer, n=40)
    batches = poisson_batches(examples, 0.5, tokenizer.pad_token_id,
                              torch.Generator().manual_seed(0), micro_batches=3)
    draws = [[next(batches)["input_ids"].shape[0] for _ in range(3)] for _ in range(50)]
    assert all(max(d) - min(d) <= 1 for d in draws)  # near-equal parts
    mean = sum(map(sum, draws)) / len(draws)
    assert 20 - 3 * 3.2 / 50 ** 0.5 * 3 < mean < 20 + 3 * 3.2 / 50 ** 0.5 * 3  # Poisson(40, 0.5)
    assert len({sum(d) for d in draws}) > 3  # the logical size varies: Poisson, not fixed


def test_noise_per_logical_step_has_std_sigma_clip_over_expected_batch(tiny_cfg, tokenizer,
                                                                        monkeypatch):
    """The same logical steps with and without noise (same draws): the difference is the
    noise alone, drawn once per logical batch, std sigma * C / B for B expected."""
    _sgd(monkeypatch)
    pad, examples = tokenizer.pad_token_id, _examples(tokenizer, n=32)
    cfg = _cfg(tiny_cfg, 4)
    model = get_model(cfg)
    start = adapter_state(model)
    sigma, clip, expected = 1.3, 0.7, 16
    noise = []
    for seed in range(4):
        noisy = _dp_gradient(model, cfg, start, _private(examples, pad, micro=4, expected=expected,
                                                         noise=sigma, clip=clip, seed=seed))
        clean = _dp_gradient(model, cfg, start, _private(examples, pad, micro=4, expected=expected,
                                                         clip=clip, seed=seed))
        noise.append(noisy - clean)
    values = torch.cat(noise)
    assert values.numel() > 10_000
    assert float(values.std()) == pytest.approx(sigma * clip / expected, rel=0.03)
    # one draw per logical batch: 4 micro-batches drawing each would give 2x the std


def test_accountant_takes_one_step_per_logical_batch_at_the_logical_rate(tiny_cfg, tokenizer):
    pad, examples = tokenizer.pad_token_id, _examples(tokenizer, n=32)
    cfg = _cfg(tiny_cfg, 4).replace(lr=1e-3)
    model = get_model(cfg)
    accountant = Accountant()
    private = _private(examples, pad, micro=4, expected=8, noise=1.1, clip=1.0,
                       accountant=accountant)
    train.train_steps(model, None, build_objective(model, cfg), cfg, num_steps=3,
                      private=private)
    assert accountant.steps == 3 and accountant._rdp.history == [(1.1, 0.25, 3)]
    reference = RDPAccountant()
    reference.history = [(1.1, 8 / 32, 3)]
    assert accountant.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_plan_uses_the_logical_sampling_rate(tiny_cfg):
    from opacus.accountants.utils import get_noise_multiplier

    cfg = tiny_cfg.replace(dp_sgd=True, dp_recipe=False, batch_size=8, grad_accum=32,
                           dp_target_epsilon=8.0)
    dp = plan(cfg, num_examples=2000, planned_steps=18)
    assert (dp.sample_rate, dp.expected_batch_size, dp.micro_batches) == (0.128, 256, 32)
    assert dp.noise_multiplier == get_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, sample_rate=0.128, steps=18, accountant="rdp")
    line = describe_plan(dp, num_examples=2000, who="client 0")
    assert "logical batch 256" in line and "sampling rate 0.128" in line and "18 steps" in line
    assert f"noise multiplier {dp.noise_multiplier:.3g}" in line and "budget 8" in line


def test_dp_recipe_fills_only_the_settings_left_at_their_defaults():
    recipe = RunConfig.from_mapping({"dp-sgd": "true"})
    assert (recipe.grad_accum, recipe.lr_schedule, recipe.lr, recipe.lora_r, recipe.lora_dropout,
            recipe.lora_target_modules) == (32, "constant", 3e-3, 4, 0.0, "q_proj,v_proj")
    assert recipe.replace(lr=2e-3).grad_accum == 32  # applying it again changes nothing
    own = RunConfig.from_mapping({"dp-sgd": "true", "grad-accum": "4", "lora-r": "16",
                                  "lr-schedule": "linear"})
    assert (own.grad_accum, own.lora_r, own.lr_schedule) == (4, 16, "linear")
    off = RunConfig.from_mapping({"dp-sgd": "true", "dp-recipe": "false"})
    plain = RunConfig()
    assert (off.grad_accum, off.lora_r, off.lr_schedule) == (plain.grad_accum, plain.lora_r,
                                                             plain.lr_schedule)
    assert RunConfig.from_mapping({"dp-recipe": "true"}).grad_accum == 1  # DP off: nothing
    # another model keeps its target modules: the recipe's names are the built-in model's
    other = RunConfig.from_mapping({"dp-sgd": "true", "model": "/some/model"})
    assert other.lora_target_modules == "all-linear"


def test_resume_stays_refused_for_dp():
    with pytest.raises(ValueError, match="cannot continue a differentially private run"):
        RunConfig(dp_sgd=True, resume_from="runs/a")


@pytest.mark.parametrize("micro", [1, 4])
def test_ghost_clipping_gives_the_hooks_clipped_sum(tiny_cfg, tokenizer, monkeypatch, micro):
    """Opacus' ghost clipping (norms without per-example gradients) against its hooks
    (per-example gradients), noise off, a clip that bites, one logical batch of 8."""
    _sgd(monkeypatch)
    pad, examples = tokenizer.pad_token_id, _examples(tokenizer, n=8)
    cfg = _cfg(tiny_cfg, micro)
    model = get_model(cfg)
    torch.manual_seed(3)
    start = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_state(model).items()}
    unclipped = _dp_gradient(model, cfg, start, _private(examples, pad, micro=micro, expected=8))
    clip = 0.3 * float(unclipped.norm())
    grads = {}
    for mode in ("hooks", "ghost"):
        private = _private(examples, pad, micro=micro, expected=8, clip=clip)
        private.grad_sample_mode = mode
        grads[mode] = _dp_gradient(model, cfg, start, private)
    assert float(grads["hooks"].norm()) < 0.9 * float(unclipped.norm())
    torch.testing.assert_close(grads["ghost"], grads["hooks"], rtol=1e-3, atol=1e-6)
    # and the model leaves as it came
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
