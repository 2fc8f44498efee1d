"""lora-aggregation: the error metric, the exact (FedEx-LoRA) and SVD modes against dense
hand computations, the residual inside a model, the strategy glue, config refusals and a
bit-exact resume per mode."""

import json
import math
import os

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import RunConfig
from common.lora_aggregation import (
    LORA_RESIDUAL_KEY, aggregate_lora, exact_aggregate, fold_residual, get_residual,
    lowrank_sq_norm, naive_error, set_residual, svd_aggregate,
)
from server.checkpoints import ServerState
from server.strategies import build_strategy
from tests.test_robust import EchoGrid

D, K, R = 12, 9, 3
WEIGHTS = [30.0, 10.0, 20.0]


def _factors(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(D, R, generator=g) for _ in range(n)]
    as_ = [torch.randn(R, K, generator=g) for _ in range(n)]
    return bs, as_


def _dense_mean(bs, as_, weights):
    w = np.array(weights) / sum(weights)
    return sum(wi * (b.double() @ a.double()).numpy() for wi, b, a in zip(w, bs, as_))


def _naive(bs, as_, weights):
    w = np.array(weights) / sum(weights)
    b = sum(wi * bi.double().numpy() for wi, bi in zip(w, bs))
    a = sum(wi * ai.double().numpy() for wi, ai in zip(w, as_))
    return b @ a


def test_lowrank_norm_and_error_match_dense_computations():
    bs, as_ = _factors(0)
    x = torch.cat(bs, dim=1)
    y = torch.cat(as_, dim=0)
    assert lowrank_sq_norm(x, y) == pytest.approx(np.linalg.norm((x.double() @ y.double()).numpy()) ** 2,
                                                  rel=1e-10)
    mean, naive = _dense_mean(bs, as_, WEIGHTS), _naive(bs, as_, WEIGHTS)
    expected = np.linalg.norm(mean - naive) / np.linalg.norm(mean)
    assert naive_error(bs, as_, WEIGHTS) == pytest.approx(expected, rel=1e-9)
    assert expected > 0.1  # random factors: a large gap, so the check can fail
    # identical clients: no gap at all (the deviation form does not cancel to noise)
    assert naive_error([bs[0]] * 3, [as_[0]] * 3, WEIGHTS) < 1e-15


def test_exact_mode_global_delta_is_the_weighted_mean_of_the_products():
    bs, as_ = _factors(1)
    first = exact_aggregate(bs, as_, WEIGHTS)
    p, q = first.residual
    delta = (first.b.double() @ first.a.double() + p.double() @ q.double()).numpy()
    np.testing.assert_allclose(delta, _dense_mean(bs, as_, WEIGHTS), rtol=1e-5, atol=1e-5)
    assert p.shape[1] <= (len(bs) - 1) * R  # the deviations sum to zero: rank (n-1) r
    # round 2: the new residual adds this round's exactly to the previous one
    bs2, as2 = _factors(2)
    second = exact_aggregate(bs2, as2, WEIGHTS, residual=(p, q))
    p2, q2 = second.residual
    increment = (p2.double() @ q2.double() - p.double() @ q.double()).numpy()
    np.testing.assert_allclose(increment + (second.b.double() @ second.a.double()).numpy(),
                               _dense_mean(bs2, as2, WEIGHTS), rtol=1e-5, atol=1e-5)
    assert second.applied_error < 1e-6 < second.naive_error


def test_svd_mode_is_the_rank_r_truncation_and_reports_the_discarded_values():
    bs, as_ = _factors(3)
    mean = _dense_mean(bs, as_, WEIGHTS)
    u, s, vt = np.linalg.svd(mean)
    result = svd_aggregate(bs, as_, WEIGHTS)
    assert result.b.shape == (D, R) and result.a.shape == (R, K)
    np.testing.assert_allclose((result.b.double() @ result.a.double()).numpy(),
                               (u[:, :R] * s[:R]) @ vt[:R], rtol=1e-4, atol=1e-5)
    expected = math.sqrt(np.sum(s[R:] ** 2)) / np.linalg.norm(mean)
    assert result.applied_error == pytest.approx(expected, rel=1e-6)
    assert 0.01 < result.applied_error < result.naive_error
    # A keeps the naive mean's Frobenius norm
    a_mean = sum(w * a for w, a in zip(np.array(WEIGHTS) / sum(WEIGHTS), as_))
    assert float(torch.linalg.norm(result.a)) == pytest.approx(float(torch.linalg.norm(a_mean)),
                                                               rel=1e-5)
    # aligned gauge: the same product, A = Ā projected on the product's top-r row space
    aligned = svd_aggregate(bs, as_, WEIGHTS, align=True)
    np.testing.assert_allclose((aligned.b.double() @ aligned.a.double()).numpy(),
                               (u[:, :R] * s[:R]) @ vt[:R], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aligned.a.double().numpy(), a_mean.double().numpy() @ vt[:R].T @ vt[:R],
                               rtol=1e-4, atol=1e-5)
    assert aligned.applied_error == pytest.approx(result.applied_error, rel=1e-9)
    assert (np.linalg.norm(aligned.a.numpy() - a_mean.numpy())
            < np.linalg.norm(result.a.numpy() - a_mean.numpy()))


def test_aggregate_lora_pairs_layers_and_leaves_other_tensors_alone():
    bs, as_ = _factors(4)
    states = [{"m.q.lora_A.weight": a, "m.q.lora_B.weight": b, "head.weight": torch.ones(2)}
              for a, b in zip(as_, bs)]
    arrays, residual, stats = aggregate_lora(states, WEIGHTS, mode="exact")
    assert set(arrays) == {"m.q.lora_A.weight", "m.q.lora_B.weight"}
    assert set(residual) == {"m.q.residual_P", "m.q.residual_Q"}
    assert stats["agg-error-mean"] == stats["agg-error-max"] == pytest.approx(
        naive_error(bs, as_, WEIGHTS))
    assert stats["applied-error-max"] < 1e-6 and stats["residual-rank-max"] == residual[
        "m.q.residual_P"].shape[1]
    arrays, residual, stats = aggregate_lora(states, WEIGHTS, mode="naive")
    assert arrays == {} and residual == {} and stats["applied-error-mean"] == stats["agg-error-mean"]
    with pytest.raises(ValueError, match="lora-aggregation must be one of naive, exact, svd"):
        aggregate_lora(states, WEIGHTS, mode="fedex")


def test_residual_hook_equals_folding_it_into_the_base_weights(tiny_cfg):
    from common.model import get_model

    model = get_model(tiny_cfg)
    layer = next(n for n, _ in model.named_modules() if n.endswith("q_proj"))
    g = torch.Generator().manual_seed(5)
    lora = model.get_submodule(layer)
    d, k = lora.base_layer.weight.shape
    residual = {f"{layer}.residual_P": torch.randn(d, 5, generator=g) * 0.1,
                f"{layer}.residual_Q": torch.randn(5, k, generator=g) * 0.1}
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        set_residual(model, residual)
        hooked = model(input_ids=ids).logits
        assert get_residual(model).keys() == residual.keys()
        set_residual(model, {})  # removed again: the cached model is shared by clients
        assert torch.equal(model(input_ids=ids).logits, plain) and not get_residual(model)
        set_residual(model, residual)
        original = lora.base_layer.weight.clone()
        assert fold_residual(model) == 1
        folded = model(input_ids=ids).logits
        lora.base_layer.weight.copy_(original)  # leave the cached model as it was
    assert not torch.allclose(hooked, plain)
    torch.testing.assert_close(folded, hooked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg, match", [
    (dict(strategy="krum", num_clients=4, min_train_clients=4), "not a weighted mean"),
    (dict(ffa_lora=True), "'ffa-lora' already makes the mean exact"),
    (dict(client_dp="server-fixed"), "'client-dp' clips"),
    (dict(dp_sgd=True), "'dp-sgd'"),
])
@pytest.mark.parametrize("mode", ["exact", "alternating"])
def test_incompatible_pairings_are_refused_in_one_line(cfg, match, mode):
    with pytest.raises(ValueError, match=match) as err:
        RunConfig(lora_aggregation=mode, **cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="lora-aggregation' must be one of"):
        RunConfig.from_mapping({"lora-aggregation": "fedex"})
    RunConfig(lora_aggregation="svd", dp_sgd=True)  # post-processing: allowed


# --- the strategy: error history, residual in messages and bytes, resume ----------------
SHAPES = {"m.q.lora_A.weight": (R, K), "m.q.lora_B.weight": (D, R), "head.weight": (2,)}


def _answer(seen: list):
    def answer(msg: Message) -> Message:
        server_round = int(msg.content["config"]["server-round"])
        node = msg.metadata.dst_node_id
        seen.append((server_round, LORA_RESIDUAL_KEY in msg.content.array_records))
        g = torch.Generator().manual_seed(100 * server_round + node)
        arrays = {k: torch.from_numpy(a.numpy().copy()) + 0.3 * torch.randn(a.shape, generator=g)
                  for k, a in msg.content["arrays"].items()}
        content = RecordDict({"arrays": ArrayRecord(arrays),
                              "metrics": MetricRecord({"train-loss": 1.0, "num-examples": 10 * node})})
        return Message(content=content, reply_to=msg)
    return answer


def _start(strategy, initial, num_rounds, seen):
    out = {}
    # two nodes: Flower samples them in random order and a float sum of two terms is
    # order-free (the existing FedAvg resume tests do the same)
    strategy.start(grid=EchoGrid([1, 2], _answer(seen)), initial_arrays=initial,
                   num_rounds=num_rounds, train_config=ConfigRecord(),
                   evaluate_fn=lambda r, arrays: out.update({r: (arrays, dict(strategy.residual))}))
    return out


def _initial():
    return ArrayRecord({k: torch.zeros(s) + 0.1 for k, s in SHAPES.items()})


@pytest.mark.parametrize("mode", ["naive", "exact", "svd", "alternating"])
def test_strategy_modes_resume_bit_identically(mode, flower_identity):
    cfg = RunConfig(num_clients=2, max_update_norm_ratio=0, lora_aggregation=mode)
    seen_whole = []
    whole = _start(build_strategy(cfg), _initial(), 3, seen_whole)
    first = build_strategy(cfg)
    seen_split = []
    after_one = _start(first, _initial(), 1, seen_split)[1][0]
    saved = ServerState(server_round=1, arrays={k: a.numpy() for k, a in after_one.items()},
                        optimizer=first.optimizer_state())
    assert ("lora-residual" in saved.optimizer) == (mode == "exact")
    assert first.aggregation_stats["agg-error-mean"] > 0.01
    second = build_strategy(cfg)
    second.load_optimizer_state(saved.optimizer)
    second.round_offset = 1
    resumed = _start(second, ArrayRecord({k: torch.from_numpy(v.copy())
                                          for k, v in saved.arrays.items()}), 2, seen_split)
    arrays, residual = resumed[2]
    for k, a in whole[3][0].items():
        assert np.array_equal(a.numpy(), arrays[k].numpy()), k
    assert whole[3][1].keys() == residual.keys()
    assert all(torch.equal(whole[3][1][k], residual[k]) for k in residual)
    # the residual reaches the clients from round 2 on, in exact mode only
    assert sorted(seen_whole) == sorted(seen_split)
    assert {has for rnd, has in seen_whole if rnd >= 2} == {mode == "exact"}
    # the head is averaged as usual in every mode
    assert not np.allclose(whole[3][0]["head.weight"].numpy(), 0.1)


class _ArrivalOrderGrid(EchoGrid):
    """Replies in the order ``order`` gives them (Flower returns them as they arrive)."""

    def __init__(self, nodes, answer, order):
        super().__init__(nodes, answer)
        self.order = order

    def send_and_receive(self, messages, timeout=None):
        return self.order(super().send_and_receive(messages, timeout))


@pytest.mark.parametrize("mode", ["naive", "svd"])
def test_the_aggregate_does_not_depend_on_which_reply_arrived_first(mode, flower_identity):
    """A float sum over 4 clients depends on its order: replies are summed in partition
    order, so a faster client cannot change the global adapter's bits."""
    def answer(msg):
        reply = _answer([])(msg)
        reply.content["metrics"]["partition-id"] = msg.metadata.dst_node_id - 1
        return reply

    results = []
    for order in (list, lambda replies: list(reversed(replies)),
                  lambda replies: replies[2:] + replies[:2]):
        strategy = build_strategy(RunConfig(num_clients=4, max_update_norm_ratio=0,
                                            lora_aggregation=mode))
        out = {}
        strategy.start(grid=_ArrivalOrderGrid([1, 2, 3, 4], answer, order),
                       initial_arrays=_initial(), num_rounds=2, train_config=ConfigRecord(),
                       evaluate_fn=lambda r, arrays: out.update({r: arrays}))
        results.append(out[2])
    for other in results[1:]:
        for k, a in results[0].items():
            assert np.array_equal(a.numpy(), other[k].numpy()), k


def test_exact_mode_counts_the_residual_in_bytes_sent(flower_identity):
    sent = {}
    for mode in ("naive", "exact"):
        strategy = build_strategy(RunConfig(num_clients=2, max_update_norm_ratio=0,
                                            lora_aggregation=mode))
        _start(strategy, _initial(), 2, [])
        sent[mode] = strategy.traffic.bytes_sent  # round 2's
    residual_floats = sum(v.numel() for v in strategy.residual.values())
    assert residual_floats and sent["exact"] - sent["naive"] >= 2 * 4 * residual_floats * 0.95


# --- a real simulation per mode: exact: 2 rounds + --resume == 4 rounds (FedAvg's resume
# test); svd (no state beyond the adapter): one run. `fedtune evaluate` reproduces both ----
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "svd"])
def test_real_run_resumes_bit_exactly_and_evaluate_reproduces_the_server(
        tiny_model_dir, tiny_dataset, tmp_path, mode):
    from safetensors.torch import load_file

    from common.lora_aggregation import RESIDUAL_FILE
    from tests.test_cli import fedtune
    from tests.test_resume import _simulate

    whole, split = tmp_path / "whole", tmp_path / "split"
    flags = ("--lora-aggregation", mode)
    _simulate(tiny_model_dir, tiny_dataset, whole, "fedavg", 4, *flags)
    whole_rows = [json.loads(l) for l in (whole / "history.jsonl").read_text().splitlines()]
    assert (whole / "adapter" / RESIDUAL_FILE).exists() == (mode == "exact")
    assert all(r["agg-error-mean"] > 0 and r["applied-error-max"] < r["agg-error-max"]
               for r in whole_rows[1:])
    assert (whole_rows[-1].get("residual-rank-max", 0) > 0) == (mode == "exact")
    assert all(r["aggregated"] == 1 for r in whole_rows[1:])  # FedAvg: every round
    if mode == "exact":
        _simulate(tiny_model_dir, tiny_dataset, split, "fedavg", 2, *flags)
        _simulate(tiny_model_dir, tiny_dataset, split, "fedavg", 4, *flags, "--resume", str(split))
        assert os.readlink(split / "adapter") == "adapters/round-4"
        for name in ["adapter_model.safetensors", RESIDUAL_FILE, "../../state/round-4.safetensors"]:
            a, b = load_file(whole / "adapter" / name), load_file(split / "adapter" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        rows = [json.loads(l) for l in (split / "history.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # appended, not restarted
        assert [r["eval-loss"] for r in rows] == [r["eval-loss"] for r in whole_rows]
        assert [r["aggregated"] for r in rows[1:]] == [1, 1, 1, 1]
        assert os.readlink(split / "best") == os.readlink(whole / "best")
        clients = [json.loads(l) for l in (split / "clients.jsonl").read_text().splitlines()]
        assert sorted(c["round"] for c in clients) == [1, 1, 2, 2, 3, 3, 4, 4]
        assert json.loads((split / "config.json").read_text())["num-server-rounds"] == 4
    # `fedtune evaluate` on the run folder gives the loss the server logged for round 4
    run = split if mode == "exact" else whole
    result = fedtune("evaluate", "--adapter", str(run), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["loss"] == pytest.approx(whole_rows[-1]["eval-loss"], rel=1e-6)


# --- heterogeneous ranks: truncate for the client, pad the reply, SVD on the server ------
def test_truncate_and_pad_keep_each_clients_scaled_update():
    from common.lora_aggregation import pad_to_rank, truncate_to_rank

    g = torch.Generator().manual_seed(7)
    big, small = 4, 2  # global rank R, client rank r; peft scaling alpha / rank
    sent = {"m.lora_B.weight": torch.randn(D, big, generator=g),
            "m.lora_A.weight": torch.randn(big, K, generator=g), "head": torch.ones(2)}
    local = truncate_to_rank(sent, rank=small, global_rank=big)
    assert local["m.lora_B.weight"].shape == (D, small) and local["head"] is sent["head"]
    # one scaling alpha / R for every rank: the client's B_r A_r is the best rank-r
    # approximation of the global B A, whatever order the global factors came in
    u, sv, vt = np.linalg.svd((sent["m.lora_B.weight"] @ sent["m.lora_A.weight"]).double().numpy())
    np.testing.assert_allclose((local["m.lora_B.weight"] @ local["m.lora_A.weight"]).double().numpy(),
                               (u[:, :small] * sv[:small]) @ vt[:small], rtol=1e-4, atol=1e-5)
    assert not np.allclose((local["m.lora_B.weight"] @ local["m.lora_A.weight"]).numpy(),
                           (sent["m.lora_B.weight"][:, :small] @ sent["m.lora_A.weight"][:small]).numpy(),
                           atol=1e-3)  # the first r columns as they came would not be
    trained = {"m.lora_B.weight": torch.randn(D, small, generator=g),
               "m.lora_A.weight": torch.randn(small, K, generator=g), "head": torch.ones(2)}
    reply = pad_to_rank(trained, sent, rank=small, global_rank=big)
    assert reply["m.lora_A.weight"].shape == (big, K)
    torch.testing.assert_close(reply["m.lora_B.weight"] @ reply["m.lora_A.weight"],
                               trained["m.lora_B.weight"] @ trained["m.lora_A.weight"])
    with pytest.raises(ValueError, match="client LoRA rank 8 must be in"):
        truncate_to_rank(sent, rank=8, global_rank=big)


def test_mixed_ranks_aggregate_to_the_hand_computed_truncated_mean():
    from common.lora_aggregation import pad_to_rank

    g = torch.Generator().manual_seed(8)
    big, ranks, weights = 4, [1, 2, 4], [10.0, 20.0, 30.0]
    sent = {"m.lora_B.weight": torch.randn(D, big, generator=g),
            "m.lora_A.weight": torch.randn(big, K, generator=g)}
    clients = [{"m.lora_B.weight": torch.randn(D, r, generator=g),
                "m.lora_A.weight": torch.randn(r, K, generator=g)} for r in ranks]
    replies = [pad_to_rank(c, sent, rank=r, global_rank=big) for c, r in zip(clients, ranks)]
    arrays, _, stats = aggregate_lora(replies, weights, mode="svd")
    # by hand: the weighted mean of the clients' updates B_i A_i (one scaling), best rank R
    w = np.array(weights) / sum(weights)
    mean = sum(wi * (c["m.lora_B.weight"].double() @ c["m.lora_A.weight"].double()).numpy()
               for wi, c, r in zip(w, clients, ranks))
    u, s, vt = np.linalg.svd(mean)
    got = (arrays["m.lora_B.weight"].double() @ arrays["m.lora_A.weight"].double()).numpy()
    np.testing.assert_allclose(got, (u[:, :big] * s[:big]) @ vt[:big], rtol=1e-4, atol=1e-5)
    expected = math.sqrt(np.sum(s[big:] ** 2)) / np.linalg.norm(mean)
    assert stats["applied-error-max"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("values, match", [
    (dict(client_lora_ranks="4,8", lora_r=8, num_clients=2), "needs 'lora-aggregation' svd"),
    (dict(client_lora_ranks="4,16", lora_r=8, num_clients=2, lora_aggregation="svd"), r"must be in \[1, lora-r 8\]"),
    (dict(client_lora_ranks=",4,8", lora_r=8, num_clients=2, lora_aggregation="svd"), "no empty entries"),
    (dict(client_lora_ranks="4,8", lora_r=8, num_clients=3, min_train_clients=2,
          lora_aggregation="svd"), "one rank per client"),
    (dict(client_lora_ranks="4,x", lora_aggregation="svd"), "comma separated integers"),
])
def test_heterogeneous_rank_config_refusals(values, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**values)
    assert RunConfig(client_lora_ranks="2,4", lora_r=4, num_clients=2,
                     lora_aggregation="svd").client_rank_list == [2, 4]


def _tiny_simulate(tiny_model_dir, tiny_dataset, run, *flags):
    """A 2-client, 2-round `fedtune simulate` of the tiny model at LoRA r 4, plus ``flags``."""
    from tests.test_cli import fedtune

    result = fedtune("simulate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
                     "--categories", "", "--num-clients", "2", "--local-steps", "2",
                     "--batch-size", "4", "--eval-examples", "8", "--max-length", "64",
                     "--lora-r", "4", *flags, "--num-server-rounds", "2", "--run-dir", str(run))
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])


def test_a_real_run_with_mixed_ranks(tiny_model_dir, tiny_dataset, tmp_path):
    run = tmp_path / "mixed"
    _tiny_simulate(tiny_model_dir, tiny_dataset, run,
                   "--client-lora-ranks", "2,4", "--lora-aggregation", "svd")
    clients = [json.loads(l) for l in (run / "clients.jsonl").read_text().splitlines()]
    assert sorted((c["partition-id"], c["lora-r"]) for c in clients) == [(0, 2), (0, 2), (1, 4), (1, 4)]
    rows = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert all(r["aggregated"] == 1 and r["rejected"] == 0 for r in rows[1:])
    # each client's bytes: round 1 sends rank 4 to both, round 2 sends partition 0 its
    # rank 2; every reply is at the client's own rank
    by = {(c["round"], c["partition-id"]): c for c in clients}
    assert by[(2, 0)]["bytes-sent"] < 0.8 * by[(2, 1)]["bytes-sent"]
    # (the same content; the message headers differ by the random node ids' varint size)
    assert abs(by[(1, 0)]["bytes-sent"] - by[(1, 1)]["bytes-sent"]) <= 16
    assert all(by[(r, 0)]["bytes-received"] < 0.8 * by[(r, 1)]["bytes-received"] for r in (1, 2))
    assert sum(c["bytes-sent"] for c in clients if c["round"] == 2) == rows[2]["bytes-sent"]


def test_plot_draws_the_aggregation_error_when_the_history_has_it(tmp_path):
    from server.plots import plot_run

    rows = [{"round": 0, "eval-loss": 4.0},
            {"round": 1, "eval-loss": 3.0, "train-loss": 3.5, "agg-error-mean": 0.04,
             "agg-error-max": 0.1, "applied-error-mean": 0.0, "applied-error-max": 1e-7}]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = [p.name for p in plot_run(tmp_path)]
    assert "aggregation.png" in names and (tmp_path / "plots" / "aggregation.png").stat().st_size > 0
    (tmp_path / "history.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert "aggregation.png" not in [p.name for p in plot_run(tmp_path)]


# --- alternating (RoLoRA): one factor trains per round, the mean is exact ---------------
def test_alternating_mode_keeps_the_sent_factor_and_its_product_is_the_exact_mean():
    bs, as_ = _factors(5)
    g = torch.Generator().manual_seed(6)
    sent = {"m.lora_A.weight": torch.randn(R, K, generator=g),
            "m.lora_B.weight": torch.randn(D, R, generator=g)}
    # the replies' A deviate (a client breaking the protocol): the server keeps its own
    states = [{"m.lora_A.weight": a, "m.lora_B.weight": b} for b, a in zip(bs, as_)]
    arrays, residual, stats = aggregate_lora(states, WEIGHTS, mode="alternating", sent=sent,
                                             factor="B")
    assert torch.equal(arrays["m.lora_A.weight"], sent["m.lora_A.weight"])
    product = (arrays["m.lora_B.weight"].double() @ arrays["m.lora_A.weight"].double()).numpy()
    np.testing.assert_allclose(product, _dense_mean(bs, [sent["m.lora_A.weight"]] * 3, WEIGHTS),
                               rtol=1e-6, atol=1e-6)
    assert residual == {} and stats["agg-error-mean"] > 0.1  # the replies' own error
    honest = [{"m.lora_A.weight": sent["m.lora_A.weight"].clone(), "m.lora_B.weight": b} for b in bs]
    assert aggregate_lora(honest, WEIGHTS, mode="alternating", sent=sent,
                          factor="B")[2]["agg-error-max"] < 1e-12
    arrays, _, _ = aggregate_lora(states, WEIGHTS, mode="alternating", sent=sent, factor="A")
    assert torch.equal(arrays["m.lora_B.weight"], sent["m.lora_B.weight"])
    product = (arrays["m.lora_B.weight"].double() @ arrays["m.lora_A.weight"].double()).numpy()
    np.testing.assert_allclose(product, _dense_mean([sent["m.lora_B.weight"]] * 3, as_, WEIGHTS),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs the adapter sent"):
        aggregate_lora(states, WEIGHTS, mode="alternating", factor="A")


def test_alternating_strategy_names_b_then_a_and_resumes_on_the_global_round(flower_identity):
    seen = []

    def answer(msg: Message) -> Message:
        config = msg.content["config"]
        seen.append((int(config["server-round"]), config["lora-train-factor"]))
        return _answer([])(msg)

    def run(strategy, initial, rounds):
        out = {}
        strategy.start(grid=EchoGrid([1, 2], answer), initial_arrays=initial,
                       num_rounds=rounds, train_config=ConfigRecord(),
                       evaluate_fn=lambda r, arrays: out.update({r: arrays}))
        return out

    cfg = RunConfig(num_clients=2, max_update_norm_ratio=0, lora_aggregation="alternating")
    out = run(build_strategy(cfg), _initial(), 3)
    assert sorted(set(seen)) == [(1, "B"), (2, "A"), (3, "B")]
    # round 1 trained B: the global A is still the initial one, bit for bit (the replies
    # perturbed it); round 2 trained A: B is round 1's
    assert np.array_equal(out[1]["m.q.lora_A.weight"].numpy(), _initial()["m.q.lora_A.weight"].numpy())
    assert not np.array_equal(out[1]["m.q.lora_B.weight"].numpy(), _initial()["m.q.lora_B.weight"].numpy())
    assert np.array_equal(out[2]["m.q.lora_B.weight"].numpy(), out[1]["m.q.lora_B.weight"].numpy())
    seen.clear()
    resumed = build_strategy(cfg)
    resumed.round_offset = 1  # a run resumed after round 1 goes on with A
    run(resumed, out[1], 1)
    assert set(seen) == {(2, "A")}


def test_set_trained_factor_freezes_the_other_factor_in_training(tiny_cfg):
    from common.lora_aggregation import set_trained_factor
    from common.model import adapter_state, get_model, load_tokenizer
    from common.objectives import build_objective
    from common.data import batches_forever, partition_examples
    from common.train import train_steps

    model, tokenizer = get_model(tiny_cfg), load_tokenizer(tiny_cfg.model)
    examples = partition_examples(tiny_cfg, 0, 2, tokenizer)
    for factor in ("B", "A"):
        before = adapter_state(model)
        set_trained_factor(model, factor)
        batches = batches_forever(examples, 4, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
        train_steps(model, batches, build_objective(model, tiny_cfg), tiny_cfg, num_steps=2)
        after = adapter_state(model)
        for name in before:
            moved = not torch.equal(before[name], after[name])
            assert moved == (f".lora_{factor}." in name), (factor, name)
    set_trained_factor(model, None)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    with pytest.raises(ValueError, match="'A' or 'B'"):
        set_trained_factor(model, "C")


def test_a_real_alternating_run_is_exact(tiny_model_dir, tiny_dataset, tmp_path):
    run = tmp_path / "alt"
    _tiny_simulate(tiny_model_dir, tiny_dataset, run,
                   "--lora-aggregation", "alternating", "--dtype", "float32")
    rows = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    assert all(r["aggregated"] == 1 and r["agg-error-max"] < 1e-9 for r in rows[1:])


def test_a_lower_rank_node_gets_and_sends_its_own_rank_and_the_server_pads_it(flower_identity):
    """Node 1 trains rank 1 of the global rank R = 3: from round 2 on it receives rank-1
    factors (the SVD-ordered global truncated, B scaled by r/R), and its rank-1 replies
    are padded to R before the guard; a reply whose shapes do not match the rank it
    declares is rejected by the guard, not padded."""
    from common.lora_aggregation import pad_to_rank, truncate_to_rank

    received, replies_by_round = {}, {}

    def answer(msg: Message) -> Message:
        node, rnd = msg.metadata.dst_node_id, int(msg.content["config"]["server-round"])
        arrays = {k: torch.from_numpy(a.numpy().copy()) for k, a in msg.content["arrays"].items()}
        received[(rnd, node)] = arrays
        rank = 1 if node == 1 else R
        if node == 1 and arrays["m.q.lora_A.weight"].shape[0] == R:
            arrays = truncate_to_rank(arrays, rank=1, global_rank=R)  # what the client does
        g = torch.Generator().manual_seed(10 * rnd + node)
        trained = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in arrays.items()}
        replies_by_round.setdefault(rnd, {})[node] = trained
        content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord(
            {"train-loss": 1.0, "num-examples": 10, "lora-r": rank})})
        return Message(content=content, reply_to=msg)

    cfg = RunConfig(num_clients=2, lora_r=R, client_lora_ranks=f"1,{R}", max_update_norm_ratio=0,
                    lora_aggregation="svd")
    strategy = build_strategy(cfg)
    out = {}
    strategy.start(grid=EchoGrid([1, 2], answer), initial_arrays=_initial(), num_rounds=2,
                   train_config=ConfigRecord(), evaluate_fn=lambda r, a: out.update({r: a}))
    assert received[(1, 1)]["m.q.lora_A.weight"].shape[0] == R  # not known yet: rank R
    assert received[(2, 1)]["m.q.lora_A.weight"].shape == (1, K)  # then its own rank
    assert received[(2, 2)]["m.q.lora_A.weight"].shape == (R, K)
    expected = truncate_to_rank(out[1].to_torch_state_dict(), rank=1, global_rank=R)
    for k, v in expected.items():
        torch.testing.assert_close(received[(2, 1)][k], v)
    assert strategy.node_ranks == {1: 1}
    # round 2's aggregate is the svd of node 1's padded reply and node 2's, by hand
    sent = out[1].to_torch_state_dict()
    padded = pad_to_rank(replies_by_round[2][1], sent, rank=1, global_rank=R)
    arrays, _, _ = aggregate_lora([padded, replies_by_round[2][2]], [10.0, 10.0], mode="svd",
                                  align=True)
    for k, v in arrays.items():
        torch.testing.assert_close(torch.from_numpy(out[2][k].numpy()), v)
    assert sum(strategy.traffic.rejected.values()) == 0

    # a rank-1 reply that declares rank 2 is not padded: the guard rejects its shapes
    def liar(msg: Message) -> Message:
        reply = answer(msg)
        reply.content["metrics"]["lora-r"] = 2
        return reply

    strategy = build_strategy(cfg)
    strategy.start(grid=EchoGrid([1, 2], liar), initial_arrays=_initial(), num_rounds=1,
                   train_config=ConfigRecord(), evaluate_fn=lambda r, a: None)
    assert sum(strategy.traffic.rejected.values()) == 1 and strategy.node_ranks == {}
