"""`fedtune simulate --backend sequential` (server/sequential.py): every client in the
server's process, through a Grid of fedtune's own. Unit tests drive the Grid with small
ClientApps; the real runs compare it with Flower's Ray engine."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.run import Run
from safetensors.numpy import load_file

from common.config import RunConfig
from common.runtime import usable_cores
from server.sequential import SequentialGrid, run_sequential
from tests.test_cli import fedtune


def _train_message(node: int, arrays: ArrayRecord) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                   node, "train")


def _grid(app: ClientApp, nodes: int = 3) -> SequentialGrid:
    return SequentialGrid(app, nodes, {"seed": 0}, Run.create_empty(run_id=1))


def test_each_node_gets_its_partition_and_keeps_its_context(flower_identity):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        visits = int(context.state["visits"]["n"]) + 1 if "visits" in context.state else 1
        context.state["visits"] = ConfigRecord({"n": visits})
        return Message(RecordDict({"metrics": MetricRecord({
            "partition": context.node_config["partition-id"],
            "of": context.node_config["num-partitions"], "visits": visits})}), reply_to=msg)

    grid = _grid(app)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    for round_ in (1, 2):
        replies = list(grid.send_and_receive([_train_message(n, arrays) for n in grid.get_node_ids()]))
        seen = sorted((r.metadata.src_node_id, dict(r.content["metrics"])) for r in replies)
        assert seen == [(n, {"partition": n - 1, "of": 3, "visits": round_}) for n in (1, 2, 3)]
    assert grid.pull_messages(["no-such-id"]) == []


def test_a_client_cannot_change_what_the_server_sent(flower_identity):
    """Messages cross as Flower's wire format: a client writing into its arrays changes
    neither the server's message nor the next client's copy."""
    app = ClientApp()
    received = []

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        array = msg.content["arrays"]["w"].numpy()
        received.append(array.copy())
        array += 100.0  # in place, into whatever buffer the message holds
        msg.content["arrays"]["w"] = Array(array)
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    sent = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    replies = list(_grid(app, 2).send_and_receive([_train_message(n, sent) for n in (1, 2)]))
    np.testing.assert_array_equal(sent["w"].numpy(), [0, 1, 2])
    for array in received:  # the second client got the original, not the first's write
        np.testing.assert_array_equal(array, [0, 1, 2])
    for reply in replies:
        np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), [100, 101, 102])


def test_a_raising_client_is_an_error_reply_and_the_others_answer(flower_identity):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk full")
        return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)

    grid = _grid(app)
    messages = [_train_message(n, ArrayRecord({"w": Array(np.zeros(1, np.float32))})) for n in (1, 2, 3)]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}
    assert sorted(replies) == [1, 2, 3]
    assert replies[2].has_error() and not replies[1].has_error() and not replies[3].has_error()
    assert replies[2].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "disk full" in replies[2].error.reason
    assert {r.metadata.reply_to_message_id for r in replies.values()} == {
        m.metadata.message_id for m in messages}


def test_the_client_apps_mods_run(flower_identity):
    """The ClientApp is called as Flower calls it, so its mods (client-side DP clipping
    is one) wrap every message."""
    def mark(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        reply.content["metrics"]["modded"] = 1
        return reply

    app = ClientApp(mods=[mark])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)

    replies = _grid(app, 1).send_and_receive([_train_message(1, ArrayRecord())])
    assert [dict(r.content["metrics"]) for r in replies] == [{"ok": 1, "modded": 1}]


def test_run_sequential_hands_the_server_app_the_grid_and_the_config(flower_identity):
    seen = {}

    def server_app(grid, context):
        seen["nodes"] = list(grid.get_node_ids())
        seen["lr"] = context.run_config["lr"]
        seen["server threads"] = context.run_config["num-threads"]
        seen["replies"] = [r.content["metrics"]["partition"] for r in grid.send_and_receive(
            [_train_message(n, ArrayRecord()) for n in grid.get_node_ids()])]

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen.setdefault("client threads", set()).add(context.run_config["num-threads"])
        return Message(RecordDict({"metrics": MetricRecord(
            {"partition": context.node_config["partition-id"]})}), reply_to=msg)

    run_sequential(RunConfig(num_clients=3, lr=5e-4), server_app=server_app, client_app=app,
                   client_threads=4)
    assert seen == {"nodes": [1, 2, 3], "lr": 5e-4, "replies": [0, 1, 2], "server threads": 1,
                    "client threads": {4}}


def test_an_unknown_backend_is_refused_in_one_line():
    result = fedtune("simulate", "--backend", "threads")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "'backend'" in line and "ray" in line and "sequential" in line


def _run(tiny_model_dir, tiny_dataset, run_dir, *extra):
    result = fedtune(
        "simulate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
        "--categories", "", "--num-clients", "2", "--local-steps", "2", "--batch-size", "4",
        "--eval-examples", "8", "--max-length", "64", "--lora-r", "4", "--lora-dropout", "0",
        "--num-server-rounds", "2", "--dtype", "float32", "--run-dir", str(run_dir), *extra)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return result, history


@pytest.mark.slow
def test_sequential_equals_ray_at_equal_threads(tiny_model_dir, tiny_dataset, tmp_path):
    """The same run under both engines with num-threads = the usable cores (Ray: one
    actor with every core; sequential: every client with every core): the same losses
    every round and the same adapter, bit for bit."""
    threads = str(usable_cores())
    _, ray = _run(tiny_model_dir, tiny_dataset, tmp_path / "ray", "--num-threads", threads)
    result, sequential = _run(tiny_model_dir, tiny_dataset, tmp_path / "seq",
                              "--num-threads", threads, "--backend", "sequential")
    keys = ("round", "eval-loss", "train-loss", "clients", "failures", "aggregated")
    assert [{k: r.get(k) for k in keys} for r in sequential] == \
        [{k: r.get(k) for k in keys} for r in ray]
    assert [r["round"] for r in ray] == [0, 1, 2]
    for name in ("adapter", "best"):
        a = load_file(tmp_path / "ray" / name / "adapter_model.safetensors")
        b = load_file(tmp_path / "seq" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "seq" / "config.json").read_text())
    assert (config["backend"], config["num-threads"]) == ("sequential", int(threads))
    # Ray's start logs a warning from its package (pinned in requirements.lock): the
    # sequential run's log has no line from Ray
    assert "site-packages/ray/" in (tmp_path / "ray" / "run.log").read_text()
    seq_log = (tmp_path / "seq" / "run.log").read_text()
    assert "site-packages/ray/" not in seq_log and "applies to `fedtune simulate`" not in seq_log


def test_backend_sequential_on_another_engine_is_warned(tiny_cfg, flower_identity):
    """`flwr run` (or any Grid but fedtune's own) ignores 'backend': the run says so."""
    from pathlib import Path

    from bench.inproc import run_federation

    run_federation({**tiny_cfg.to_mapping(), "backend": "sequential", "num-server-rounds": 1})
    log = (Path(tiny_cfg.run_dir) / "run.log").read_text()
    assert "'backend' sequential applies to `fedtune simulate`" in log


@pytest.mark.slow
def test_the_saved_config_keeps_num_threads_as_given(tiny_model_dir, tiny_dataset, tmp_path):
    """Sequential clients use every core, but only in that process: the run's config
    (what --resume reads, perhaps under --backend ray) keeps num-threads 1."""
    _run(tiny_model_dir, tiny_dataset, tmp_path / "seq", "--backend", "sequential",
         "--num-server-rounds", "1")
    config = json.loads((tmp_path / "seq" / "config.json").read_text())
    assert (config["backend"], config["num-threads"]) == ("sequential", 1)


def test_fedtune_train_refuses_backend_before_any_work(tmp_path):
    result = fedtune("train", "--backend", "sequential", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "config 'backend' (sequential) chooses `fedtune simulate`'s engine" in \
        result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
