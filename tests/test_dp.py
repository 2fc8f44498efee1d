"""DP-SGD (common/dp.py), its accountant across rounds, the budget, FFA-LoRA and the
client-level DP wrappers, on a tiny config-built Llama."""

import json
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from opacus.accountants import RDPAccountant

from common.config import DP_EPSILON_KEY, RunConfig
from common.data import collate
from common.dp import (
    Accountant, BudgetExhausted, DPPlan, PrivateTraining, check_budget, plan, private_training,
)
from common.model import adapter_state, get_model, load_tokenizer, set_adapter_state
from common.objectives import build_objective
from common.train import make_optimizer, train_steps
from server.privacy import client_level_epsilon
from server.strategies import build_strategy
from tests.conftest import write_records
from common.data import partition_examples
from tests.test_classification import labelled_dataset, tiny_encoder_dir  # noqa: F401 (fixtures)
from tests.test_cli import fedtune
from tests.test_robust import FakeGrid


def _examples(tokenizer, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 8 + i % 5
        ids = torch.randint(5, 1000, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return rows


def _cfg(tiny_cfg, **changes):
    return tiny_cfg.replace(lora_dropout=0.0, max_grad_norm=0.0, lr=1e-2,
                            lr_schedule="constant", batch_size=4, **changes)


def _fixed(batch):
    while True:
        yield batch


def _private(examples, pad, *, noise=0.0, clip=1e9, rate=1.0, seed=0, accountant=None,
             mode="hooks"):
    dp = DPPlan(noise_multiplier=noise, sample_rate=rate,
                expected_batch_size=round(rate * len(examples)), max_grad_norm=clip,
                delta=1e-5, budget=0.0, planned_steps=10)
    return PrivateTraining(dp, accountant or Accountant(), examples, pad,
                           torch.Generator().manual_seed(seed), mode)


@pytest.mark.parametrize("proximal_mu, mode, objective", [
    (0.0, "hooks", {}), (0.5, "hooks", {}), (0.0, "functorch", {}),
    (0.0, "hooks", {"l2sp_weight": 0.1}), (0.0, "hooks", {"distill_teacher": "base"})])
def test_zero_noise_unbounded_clip_equals_plain_training_step_for_step(tiny_cfg, tokenizer,
                                                                       proximal_mu, mode,
                                                                       objective):
    """Guards against the class of Opacus+PEFT bug that silently corrupts LoRA updates
    (opacus issue 820), and checks that every objective term still acts under DP."""
    cfg = _cfg(tiny_cfg, **objective)
    model, pad = get_model(cfg), tokenizer.pad_token_id
    examples = _examples(tokenizer, n=4)
    batch = collate(examples, pad)  # sample rate 1: the Poisson batch is every example
    start = {k: v + 0.01 * torch.randn_like(v) for k, v in adapter_state(model).items()}
    for steps in (1, 2, 3):
        set_adapter_state(model, start)
        objective = build_objective(model, cfg, proximal_mu=proximal_mu)
        train_steps(model, _fixed(batch), objective, cfg, num_steps=steps)
        plain = adapter_state(model)
        set_adapter_state(model, start)
        objective = build_objective(model, cfg, proximal_mu=proximal_mu)
        train_steps(model, _fixed(batch), objective, cfg, num_steps=steps,
                    private=_private(examples, pad, mode=mode))
        private = adapter_state(model)
        moved = max(float((plain[k] - start[k]).abs().max()) for k in plain)
        diff = max(float((plain[k] - private[k]).abs().max()) for k in plain)
        assert moved > 1e-3 and diff < 1e-4 * max(1.0, moved), (steps, moved, diff)
    # and the model leaves as it came: no Opacus hooks, no per-sample gradients
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_dp_sgd_on_a_bert_classifier_equals_plain_training_at_zero_noise(
        tiny_encoder_dir, labelled_dataset, tmp_path):
    """The classification head (peft modules_to_save) gets per-example gradients too."""
    from tests.test_classification import _cfg as classification_cfg

    cfg = classification_cfg(tiny_encoder_dir, labelled_dataset, tmp_path, lora_dropout=0.0,
                             max_grad_norm=0.0, lr_schedule="constant", batch_size=4,
                             dtype="float32")  # DP computes in fp32: the plain run too
    tokenizer = load_tokenizer(cfg.model)
    model = get_model(cfg)
    examples = partition_examples(cfg, 0, 2, tokenizer)[:4]
    batch = collate(examples, tokenizer.pad_token_id)
    start = adapter_state(model)
    finals = []
    for private in (None, _private(examples, tokenizer.pad_token_id)):
        set_adapter_state(model, start)
        torch.manual_seed(0)  # BERT's own dropout: the same masks in both runs
        train_steps(model, _fixed(batch), build_objective(model, cfg), cfg, num_steps=2,
                    private=private)
        finals.append(adapter_state(model))
    head = [k for k in start if "classifier" in k or "score" in k]
    assert head and any(not torch.equal(finals[1][k], start[k]) for k in head)
    for name in start:
        torch.testing.assert_close(finals[1][name], finals[0][name], rtol=1e-4, atol=1e-5)


def _clipped_sum(model, cfg, examples, pad, clip):
    """Opacus' clipped per-sample gradient sum for ``examples`` (one flat vector)."""
    optimizer = make_optimizer(model, cfg)
    objective = build_objective(model, cfg)
    with private_training(model, optimizer, objective, _private(examples, pad, clip=clip)
                          ) as (dp_optimizer, task, _):
        task(model, collate(examples, pad)).backward()
        dp_optimizer.clip_and_accumulate()
        return torch.cat([p.summed_grad.flatten() for p in dp_optimizer.params])


def test_per_sample_gradients_are_clipped_to_the_norm(tiny_cfg, tokenizer):
    cfg = _cfg(tiny_cfg)
    model, pad = get_model(cfg), tokenizer.pad_token_id
    set_adapter_state(model, {k: v + 0.05 * torch.randn_like(v)
                              for k, v in adapter_state(model).items()})
    examples = _examples(tokenizer, n=4)
    raw = [_clipped_sum(model, cfg, [e], pad, clip=1e9).norm() for e in examples]
    clip = 0.5 * float(min(raw))  # every example's gradient is above the clip
    singles = [_clipped_sum(model, cfg, [e], pad, clip=clip) for e in examples]
    for single in singles:
        assert float(single.norm()) == pytest.approx(clip, rel=1e-4)
    # a batch's sum is the sum of the individually clipped gradients
    together = _clipped_sum(model, cfg, examples, pad, clip=clip)
    torch.testing.assert_close(together, sum(singles), rtol=1e-4, atol=1e-6)


def test_noise_std_is_noise_multiplier_times_clip(tiny_cfg, tokenizer):
    """An empty Poisson batch still steps: its gradient is the noise alone."""
    cfg = _cfg(tiny_cfg)
    model, pad = get_model(cfg), tokenizer.pad_token_id
    examples = _examples(tokenizer, n=4)
    noise, clip = 1.3, 0.7
    private = _private(examples, pad, noise=noise, clip=clip, rate=0.5)
    optimizer = make_optimizer(model, cfg)
    draws = []
    with private_training(model, optimizer, build_objective(model, cfg), private) as (opt, _, _):
        for _ in range(5):
            for p in opt.params:
                p.grad_sample = torch.zeros((0, *p.shape))  # the empty batch
            assert opt.pre_step()
            draws += [p.grad.flatten().clone() for p in opt.params]
            opt.zero_grad()
    values = torch.cat(draws)
    std = float(values.std() * private.plan.expected_batch_size)  # Opacus divides by it
    assert values.numel() > 10_000
    assert std == pytest.approx(noise * clip, rel=0.03)
    assert float(values.mean()) == pytest.approx(0.0, abs=3 * std / values.numel() ** 0.5)


def test_epsilon_grows_and_matches_opacus_accountant_across_rounds(tiny_cfg, tokenizer):
    cfg = _cfg(tiny_cfg)
    model, pad = get_model(cfg), tokenizer.pad_token_id
    examples = _examples(tokenizer, n=8)
    state, epsilons = None, []
    for round_ in range(2):  # the accountant travels as JSON, as in context.state
        accountant = Accountant.from_json(state) if state else Accountant()
        private = _private(examples, pad, noise=1.1, clip=1.0, rate=0.5, seed=round_,
                           accountant=accountant)
        train_steps(model, None, build_objective(model, cfg), cfg, num_steps=3, private=private)
        state = accountant.to_json()
        epsilons.append(accountant.epsilon(1e-5))
    reference = RDPAccountant()
    reference.history = [(1.1, 0.5, 6)]
    assert Accountant.from_json(state).steps == 6
    assert epsilons[0] < epsilons[1]
    assert epsilons[1] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_noise_from_target_epsilon_spends_the_budget_exactly_once(tiny_cfg):
    cfg = tiny_cfg.replace(dp_sgd=True, dp_target_epsilon=2.0, batch_size=4, dp_recipe=False)
    dp = plan(cfg, num_examples=200, planned_steps=30)
    assert dp.sample_rate == pytest.approx(0.02)
    accountant = Accountant()
    assert 1.9 < accountant.epsilon_after(dp, 30) <= 2.0
    check_budget(accountant, dp, 30)  # the whole plan fits
    accountant = Accountant([(dp.noise_multiplier, dp.sample_rate, 30)])
    with pytest.raises(BudgetExhausted, match="budget 2"):
        check_budget(accountant, dp, 1)


def _client_train(cfg, context, server_round=1):
    from client.app import train

    strategy = build_strategy(cfg.replace(min_train_clients=1))
    initial = ArrayRecord(adapter_state(get_model(cfg)))
    msg = list(strategy.configure_train(server_round, initial, ConfigRecord(), FakeGrid([1])))[0]
    return train(msg, context)


def _context(cfg):
    return Context(run_id=1, node_id=1, state=RecordDict(), run_config=cfg.to_mapping(),
                   node_config={"partition-id": 0, "num-partitions": 2})


def test_client_accountant_survives_rounds_and_budget_is_enforced(tiny_cfg, flower_identity,
                                                                  tokenizer):
    from common.data import partition_examples

    # a budget that fits two rounds of 2 steps at this noise, not three
    base = tiny_cfg.replace(dp_sgd=True, local_steps=2, num_server_rounds=3, batch_size=4,
                            grad_accum=2,
                            dp_noise_multiplier=1.0, dp_target_epsilon=1.0, dp_delta=1e-3)
    examples = len(partition_examples(base, 0, 2, tokenizer))
    q = min(1.0, base.batch_size * base.grad_accum / examples)  # the logical rate
    eps = [Accountant([(1.0, q, s)]).epsilon(1e-3) for s in (2, 4, 6)]
    cfg = base.replace(dp_target_epsilon=round((eps[1] + eps[2]) / 2, 3))
    context = _context(cfg)
    replies = [_client_train(cfg, context, r) for r in (1, 2, 3)]
    assert not replies[0].has_error() and not replies[1].has_error()
    reported = [r.content["metrics"][DP_EPSILON_KEY] for r in replies[:2]]
    assert reported == pytest.approx(eps[:2], rel=1e-9)  # composed over rounds
    assert replies[1].content["metrics"]["dp-steps"] == 4
    assert replies[2].has_error() and "privacy budget exhausted" in replies[2].error.reason
    # a new context (another run) starts from zero: the state lives in the context
    fresh = _client_train(cfg, _context(cfg))
    assert fresh.content["metrics"][DP_EPSILON_KEY] == pytest.approx(eps[0], rel=1e-9)


def test_server_logs_the_refusal_and_the_largest_epsilon(tiny_cfg, flower_identity):
    from flwr.app import Error, Message

    from common.dp import DP_REFUSAL_CODE

    cfg = tiny_cfg.replace(dp_sgd=True, min_train_clients=1)
    strategy = build_strategy(cfg)
    initial = ArrayRecord(adapter_state(get_model(cfg)))
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1, 2])))
    ok = _client_train(cfg, _context(cfg))
    refused = Message(Error(code=DP_REFUSAL_CODE, reason="privacy budget exhausted"),
                      reply_to=sent[1])
    arrays, _ = strategy.aggregate_train(1, [ok, refused])
    assert arrays is not None
    assert (strategy.traffic.dp_refused, strategy.traffic.failures) == (1, 1)


@pytest.mark.parametrize("values, message", [
    ({"dp-sgd": "true", "dp-max-grad-norm": "0"}, "'dp-max-grad-norm' must be > 0"),
    ({"dp-sgd": "true", "dp-delta": "1"}, "'dp-delta' must be in"),
    ({"dp-sgd": "true", "dp-target-epsilon": "0"}, "set a budget or a noise multiplier"),
    ({"client-dp": "server-fixed", "transport-dtype": "float16"}, "needs 'transport-dtype'"),
    ({"client-dp": "server-fixed", "strategy": "fedmedian", "min-train-clients": "3",
      "num-clients": "3"}, "is not a mean"),
    ({"client-dp": "gaussian"}, "'client-dp' must be one of"),
])
def test_bad_privacy_settings_are_one_line_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_mapping(values)


def test_plan_refuses_large_delta_and_unreachable_epsilon(tiny_cfg):
    cfg = tiny_cfg.replace(dp_sgd=True, dp_delta=0.05)
    with pytest.raises(ValueError, match="'dp-delta' = 0.05 is not below 1/30"):
        plan(cfg, num_examples=30, planned_steps=10)
    cfg = tiny_cfg.replace(dp_sgd=True, dp_target_epsilon=1e-7)
    with pytest.raises(ValueError, match="'dp-target-epsilon' = 1e-07 cannot be reached"):
        plan(cfg, num_examples=1000, planned_steps=100_000)


def test_simulate_refuses_a_delta_too_large_for_the_partitions(tiny_model_dir, tiny_dataset,
                                                              tmp_path):
    result = fedtune("simulate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
                     "--categories", "", "--num-clients", "2", "--dp-sgd", "true",
                     "--dp-delta", "0.1", "--eval-examples", "8", "--run-dir", str(tmp_path / "run"),
                     timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # above it: data-loading progress bars
    assert re.fullmatch(r"fedtune: error: config 'dp-delta' = 0.1 is not below 1/\d+ .*", last)
    assert not (tmp_path / "run").exists()


def test_ffa_lora_trains_and_sends_only_b(tiny_cfg, tokenizer):
    cfg = _cfg(tiny_cfg, ffa_lora=True)
    model, full = get_model(cfg), get_model(_cfg(tiny_cfg))
    wire, everything = adapter_state(model), adapter_state(full)
    assert wire and all(".lora_B." in k for k in wire)
    assert sum(v.numel() for v in wire.values()) * 2 == sum(v.numel() for v in everything.values())
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    batch = collate(_examples(tokenizer, n=4), tokenizer.pad_token_id)
    train_steps(model, _fixed(batch), build_objective(model, cfg), cfg, num_steps=2)
    assert all(torch.equal(p, a_before[n]) for n, p in model.named_parameters()
               if ".lora_A." in n)
    assert any(float(v.abs().max()) > 0 for v in adapter_state(model).values())  # B moved
    # A stays the seeded init, which every process builds the same
    from peft import get_peft_model, get_peft_model_state_dict

    from common.model import load_base_model, lora_config

    torch.manual_seed(cfg.seed)
    fresh = get_peft_model(load_base_model(cfg.model), lora_config(cfg))
    a_of = lambda m: {k: v for k, v in get_peft_model_state_dict(m).items() if ".lora_A." in k}  # noqa: E731
    torch.testing.assert_close(a_of(model), a_of(fresh))


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "server-adaptive",
                                  "client-adaptive", "local"])
def test_client_level_dp_wraps_the_strategy_and_accounts_with_opacus(tiny_cfg, mode):
    cfg = tiny_cfg.replace(client_dp=mode, client_dp_noise_multiplier=0.8)
    strategy = build_strategy(cfg)
    assert hasattr(strategy, "traffic") or hasattr(strategy, "configure_train")
    assert strategy.transport_dtype == "float32"  # the wrapper forwards to our strategy
    if mode != "local":
        assert type(strategy).__name__.startswith("FedTuneDifferentialPrivacy")
        assert strategy.strategy.weighted_by_key == "unit-weight"
    eps = [client_level_epsilon(cfg, r) for r in (1, 2, 3)]
    assert eps[0] < eps[1] < eps[2]
    if mode != "local":
        reference = RDPAccountant()
        reference.history = [(0.8, 1.0, 3)]
        assert eps[2] == pytest.approx(reference.get_epsilon(cfg.dp_delta), rel=1e-9)


def test_server_side_fixed_clipping_bounds_each_update(tiny_cfg, flower_identity):
    """Two clients, one with a huge update: after clipping at C and averaging without
    weights, the global step is at most C (plus the noise, here zero)."""
    from tests.test_robust import _reply

    cfg = tiny_cfg.replace(client_dp="server-fixed", client_dp_noise_multiplier=0.0,
                           client_dp_clipping_norm=0.01, min_train_clients=2,
                           max_update_norm_ratio=0.0)
    strategy = build_strategy(cfg)
    start = adapter_state(get_model(cfg))
    initial = ArrayRecord({k: v.clone() for k, v in start.items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1, 2])))
    big = {k: v + 5.0 for k, v in start.items()}
    small = {k: v + 1e-4 for k, v in start.items()}
    replies = [_reply(sent[0], big, num_examples=1000, **{"unit-weight": 1}),
               _reply(sent[1], small, num_examples=1, **{"unit-weight": 1})]
    arrays, _ = strategy.aggregate_train(1, replies)
    step = np.concatenate([(arrays[k].numpy() - start[k].numpy()).ravel() for k in start])
    assert np.linalg.norm(step) <= 0.01 + 1e-6
    assert np.linalg.norm(step) > 0.004  # the big update still counts, clipped to C/2


def test_centralized_training_with_dp_sgd_records_epsilon(tiny_model_dir, tiny_dataset,
                                                         tmp_path):
    run_dir = tmp_path / "run"
    result = fedtune("train", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
                     "--categories", "", "--num-clients", "2", "--num-server-rounds", "2",
                     "--local-steps", "2", "--batch-size", "4", "--eval-examples", "8",
                     "--max-length", "64", "--lora-r", "4", "--dp-sgd", "true",
                     "--dp-target-epsilon", "3", "--dp-delta", "1e-3", "--grad-accum", "2",
                     "--run-dir", str(run_dir), timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "DP-SGD plan, pooled data" in result.stdout  # printed before training
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    eps = [row["epsilon"] for row in history[1:]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 3.0


def test_a_round_flower_dp_refuses_is_recorded_as_not_aggregated(tiny_cfg, flower_identity):
    """Flower's DP wrappers skip a round with an error reply (the noise would not cover
    the larger share of the others); the traffic must say so, not 'aggregated'."""
    from flwr.app import Error, Message

    from tests.test_robust import _reply

    cfg = tiny_cfg.replace(client_dp="server-fixed", min_train_clients=2)
    strategy = build_strategy(cfg)
    start = adapter_state(get_model(cfg))
    initial = ArrayRecord({k: v.clone() for k, v in start.items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), FakeGrid([1, 2])))
    replies = [_reply(sent[0], {k: v + 1e-3 for k, v in start.items()}, **{"unit-weight": 1}),
               Message(Error(code=0, reason="client crashed"), reply_to=sent[1])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None
    traffic = strategy.traffic
    assert (traffic.aggregated, traffic.replies, traffic.failures) == (False, 1, 1)
    assert traffic.bytes_received > 0


@pytest.mark.slow
def test_dp_simulation_records_epsilon_per_round(tiny_model_dir, tmp_path):
    data = write_records(tmp_path / "d.jsonl", per_category=40)
    run_dir = tmp_path / "run"
    result = fedtune(
        "simulate", "--model", str(tiny_model_dir), "--dataset", str(data),
        "--categories", "", "--partitioner", "iid", "--num-clients", "2",
        "--num-server-rounds", "2", "--local-steps", "2", "--batch-size", "4",
        "--eval-examples", "8", "--max-length", "64", "--lora-r", "4",
        "--dp-sgd", "true", "--dp-target-epsilon", "4", "--ffa-lora", "true", "--grad-accum", "2",
        "--client-dp", "server-fixed", "--client-dp-noise-multiplier", "0.5",
        "--run-dir", str(run_dir))
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["round"] for row in history] == [0, 1, 2]
    eps = [row["epsilon"] for row in history[1:]]
    assert 0 < eps[0] < eps[1] <= 4.0
    client_eps = [row["client-epsilon"] for row in history[1:]]
    assert 0 < client_eps[0] < client_eps[1]
    assert all(row["aggregated"] == 1 for row in history[1:])
    assert "epsilon" in result.stdout
    assert "DP-SGD plan, client 0" in result.stdout  # printed before training
    assert "per-sample gradients in float32 for up to" in result.stdout  # the CPU warning
    assert "Optimal order" not in result.stdout + result.stderr  # Opacus noise filtered
