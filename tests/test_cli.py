"""The `fedtune` command as a user runs it: bad input, then a real 2-client run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def fedtune(*args, timeout=600, tag=""):
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               FEDTUNE_TEST_TAG=tag)
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _tagged_processes(tag: str) -> list[int]:
    """Processes that inherited ``FEDTUNE_TEST_TAG=tag``: the run's own simulation and
    Ray processes, and no one else's (the machine may run other simulations)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if f"FEDTUNE_TEST_TAG={tag}".encode() in environ.split(b"\0"):
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("args, message", [
    (["--model", "./no/such/model"], "model path './no/such/model' does not exist"),
    (["--dataset", "missing.jsonl"], "dataset file 'missing.jsonl' does not exist"),
    (["--local-step", "3"], "unknown option '--local-step'; did you mean '--local-steps'?"),
    (["--run-config", "lokal-steps=3"], "unknown config key 'lokal-steps'"),
    (["--num-clients", "5"], "gives 4 clients but 5 were asked for"),
    (["--lr", "-1"], "config 'lr' must be > 0"),
    (["--lora-target-modules", "q_proj,qkv"], "qkv not in model 'smollm2-135m-instruct'; its "
                                              "linear layers are down_proj, gate_proj, k_proj"),
])
def test_bad_input_is_one_clear_line_and_nothing_written(tmp_path, args, message):
    run_dir = tmp_path / "run"
    result = fedtune("simulate", *args, "--run-dir", str(run_dir), timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_malformed_dataset_file_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not json\n")
    result = fedtune("simulate", "--dataset", str(bad), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert f"dataset file '{bad}' line 1 is not JSON" in result.stderr


def test_two_clients_two_rounds_end_to_end(tiny_model_dir, tiny_dataset, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    tag = f"e2e-{os.getpid()}-{run_dir.name}"
    result = fedtune(
        "simulate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset),
        "--categories", "", "--num-clients", "2", "--num-server-rounds", "2",
        "--local-steps", "2", "--batch-size", "4", "--eval-examples", "8",
        "--max-length", "64", "--lora-r", "64", "--run-dir", str(run_dir), "--tensorboard",
        "--transport-dtype", "float16", tag=tag)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "held-out perplexity" in result.stdout
    assert f"try it: fedtune generate --adapter {run_dir} --prompt \"Name item" in result.stdout
    assert "plotting failed" not in result.stderr

    # the run folder's extras: best adapter, the printed story, curves, TensorBoard
    assert os.readlink(run_dir / "best") in ("adapters/round-1", "adapters/round-2")
    run_log = (run_dir / "run.log").read_text()
    assert run_log.count("fedtune | round") == 3 and "try it: fedtune generate" in run_log
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == [
        "aggregation.png", "clients.png", "loss.png", "perplexity.png", "traffic.png"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    history = [json.loads(l) for l in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [row["round"] for row in history] == [0, 1, 2]
    assert all(row["bytes-sent"] > 0 and row["clients"] == 2 for row in history[1:])
    # float16 transport: each message carries 2 bytes per adapter value, half of float32's
    # 4 (plus the framing: r=64 makes the tensors dominate even on the tiny model)
    from safetensors.torch import load_file

    numel = sum(t.numel() for t in load_file(run_dir / "adapter" / "adapter_model.safetensors").values())
    for key in ("bytes-sent", "bytes-received"):
        per_client = history[2][key] / 2
        assert 0.5 < per_client / (4 * numel) < 0.56, (key, per_client, numel)
    assert history[-1]["mb-total"] == pytest.approx(
        sum(r["bytes-sent"] + r["bytes-received"] for r in history[1:]) / 1e6, abs=1e-3)
    assert f"total {history[-1]['mb-total']:7.2f} MB" in run_log
    clients = [json.loads(l) for l in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert sorted((c["round"], c["partition-id"]) for c in clients) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert json.loads((run_dir / "config.json").read_text())["num-clients"] == 2
    # the preflight's data counts, recorded beside config.json (60 records, 8 held out)
    stats = json.loads((run_dir / "data-stats.json").read_text())["splits"]
    assert sorted(stats) == ["client 0", "client 1", "held-out"]
    assert sum(s["kept"] for s in stats.values()) == 60 and stats["held-out"]["kept"] == 8
    assert "data | client 0: " in run_log

    # the saved global adapter is a normal PEFT adapter: it loads and generates
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    assert (run_dir / "adapters" / "round-1" / "adapter_model.safetensors").exists()
    assert _tagged_processes(tag) == [], "the simulation left processes running"


def test_printed_commands_name_fedtune_as_the_user_can_paste_it(tmp_path, monkeypatch):
    from server.cli import invoked_as

    script = tmp_path / "venv" / "bin" / "fedtune"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["venv/bin/fedtune"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # venv not activated: `fedtune` alone fails
    assert invoked_as() == "venv/bin/fedtune"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")  # activated
    assert invoked_as() == "fedtune"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "server" / "cli.py")])  # python -m server.cli
    assert invoked_as() == "fedtune"


def test_every_flag_of_every_subcommand_shows_its_default_and_each_has_an_example():
    from server.cli import build_parser

    parser = build_parser()
    assert "example" in parser.epilog
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():
        assert sub.epilog and "example" in sub.epilog and f"fedtune {name}" in sub.epilog, name
        assert f"usage: fedtune {name}" in sub.format_help()  # argparse %-formats every help
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                text = action.help or ""
                assert "default" in text or "required" in text, (name, action.option_strings)


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_reader_that_goes_away_ends_the_command_quietly(unbuffered):
    """`fedtune ... | head -1`: the console entry ends with status 1 and no
    BrokenPipeError traceback or 'Exception ignored' line, buffered or not. 100 KB of
    output is more than a pipe holds, so the write fails whether or not the read end
    closed before the child started writing."""
    code = ("import sys, server.cli as cli\n"
            "cli.main = lambda argv=None: (print('x' * 100_000), 0)[1]\n"
            "sys.exit(cli.console_main())\n")
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 1
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
