"""The deployment without Docker (docs/deployment.md): a SuperLink and SuperNodes as
separate processes on loopback, with TLS and SuperNode authentication on."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from scripts.make_certs import main as make_certs
from tests.conftest import write_records
from tests.deploy.flower import (
    BIN, CONNECTION, ROOT, Processes, flower_env, free_port, superlink_args, supernode_args,
    wait_for_port, wait_online, write_connection,
)


@pytest.fixture()
def certs(tmp_path) -> Path:
    out = tmp_path / "certs"
    make_certs(["--out", str(out), "--nodes", "3", "--unauthorized", "intruder"])
    return out


@pytest.mark.slow
def test_superlink_and_supernodes_on_loopback_with_tls_and_node_auth(
        certs, tiny_model_dir, tmp_path):
    flwr_home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    env = flower_env(flwr_home)
    port = free_port()
    address = f"127.0.0.1:{port}"
    write_connection(flwr_home, address, certs / "ca.crt")
    # The server's dataset (held-out evaluation and node 0's partition), and node 1's
    # own private folder in a different record format: data-path replaces the partition.
    dataset = write_records(tmp_path / "server.jsonl")
    own = tmp_path / "node1-data"
    own.mkdir()
    write_records(own / "part-a.jsonl", categories=("gamma",), per_category=12)
    write_records(own / "part-b.jsonl", categories=("delta",), per_category=12)
    procs = Processes(tmp_path / "logs")
    try:
        procs.start("superlink",
                    superlink_args(certs / "superlink", port, tmp_path / "state.db"), env)
        wait_for_port(port)
        register = subprocess.run(["sh", str(ROOT / "docker/register-supernodes.sh"),
                                   str(certs / "superlink" / "authorized"), CONNECTION],
                                  env=env, capture_output=True, text=True, timeout=120)
        assert register.returncode == 0, register.stderr
        nodes = {
            "node0": "partition-id=0 num-partitions=2",
            "node1": f"partition-id=1 data-path='{own}'",
            # a node whose data folder was not mounted: its ClientApp fails each round
            # and the server goes on with the other two
            "node2": f"partition-id=2 data-path='{tmp_path / 'not-mounted'}'",
        }
        for i, (name, node_config) in enumerate(nodes.items()):
            key = certs / f"supernode-{i}" / "supernode.key"
            procs.start(name, supernode_args(address, certs / "ca.crt", key, node_config,
                                             free_port()), env)

        # Bad input fails fast with a non-zero exit, while the federation runs:
        # a key the SuperLink does not list, a certificate from another CA, a wrong port.
        other = tmp_path / "other-certs"
        make_certs(["--out", str(other), "--nodes", "1"])
        key0 = certs / "supernode-0" / "supernode.key"
        bad = {
            "intruder": supernode_args(address, certs / "ca.crt",
                                       certs / "intruder" / "supernode.key",
                                       "partition-id=0", free_port()),
            "wrong-ca": supernode_args(address, other / "ca.crt", key0, "partition-id=0",
                                       free_port()),
            "wrong-address": supernode_args(f"127.0.0.1:{free_port()}", certs / "ca.crt", key0,
                                            "partition-id=0", free_port(), max_wait_time=10),
        }
        for name, args in bad.items():
            procs.start(name, args, env)

        wait_online(env, 3)
        run_config = (f"model='{tiny_model_dir}' dataset='{dataset}' categories='' "
                      f"num-clients=2 min-train-clients=2 num-server-rounds=2 local-steps=2 "
                      f"batch-size=4 eval-examples=8 max-length=64 lora-r=4 "
                      f"run-dir='{run_dir}'")
        run = subprocess.run([str(BIN / "flwr"), "run", ".", CONNECTION, "--stream",
                              "--run-config", run_config],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

        for name in bad:  # they gave up long ago; the wait is a bound, not a sleep
            assert procs.procs[name].wait(timeout=60) != 0, procs.log(name)
    finally:
        procs.stop()

    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["round"] for row in history] == [0, 1, 2]
    assert all(row["clients"] == 2 and row["failures"] == 1 for row in history[1:]), history
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    clients = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert {c["partition-id"] for c in clients} == {0, 1}
    # node 1 trained on its own 24 records, not on a partition of the server's dataset
    assert {c["num-examples"] for c in clients if c["partition-id"] == 1} == {24}
    # the failing node is named in the run's log with the path to mount
    assert "data-path" in run.stdout and "not-mounted" in run.stdout, run.stdout[-3000:]
    assert "Failed to activate SuperNode" in procs.log("intruder")
    assert "CERTIFICATE_VERIFY_FAILED" in procs.log("wrong-ca")
    assert "Connection refused" in procs.log("wrong-address")
