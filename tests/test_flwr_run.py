"""`flwr run .`: the project is a Flower App that Flower's own CLI runs end to end."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SUPERLINK_PORT = 39091  # where `flwr run` starts (or finds) its local SuperLink


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _superlinks(flwr_home: Path) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()[1:]
            if "flower-superlink" in line and str(flwr_home) in line]


def _kill_superlinks(flwr_home: Path) -> None:
    """`flwr run` leaves the SuperLink it started running; this test must not."""
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        for pid in _superlinks(flwr_home):
            os.kill(pid, sig)
        deadline = time.time() + 10
        while _superlinks(flwr_home) and time.time() < deadline:
            time.sleep(0.5)
        if not _superlinks(flwr_home):
            return


@pytest.mark.slow
@pytest.mark.skipif(_port_in_use(LOCAL_SUPERLINK_PORT),
                    reason="a SuperLink already listens on 39091; `flwr run` would reuse it")
def test_flwr_run_completes_a_federation_with_algorithms_from_config(tiny_model_dir, tiny_dataset, tmp_path):
    flwr_home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1",
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    # Algorithms by configuration alone, through Flower's own CLI: a server optimizer,
    # an L2-SP penalty and distillation from the base model, together.
    run_config = (f"model='{tiny_model_dir}' dataset='{tiny_dataset}' categories='' "
                  f"strategy='fedadam' l2sp-weight=0.01 distill-teacher='base' "
                  f"num-clients=2 num-server-rounds=2 local-steps=2 batch-size=4 "
                  f"eval-examples=8 max-length=64 lora-r=4 run-dir='{run_dir}'")
    try:
        result = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "--stream", "--run-config", run_config,
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _kill_superlinks(flwr_home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["round"] for row in history] == [0, 1, 2]
    assert all(row["clients"] == 2 for row in history[1:])
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    # the same end as `fedtune simulate`: summary lines in run.log, and the plots
    log = (run_dir / "run.log").read_text()
    assert "held-out perplexity" in log and f"run folder: {run_dir}" in log and "try it: " in log
    assert {"loss.png", "perplexity.png"} <= {p.name for p in (run_dir / "plots").iterdir()}
