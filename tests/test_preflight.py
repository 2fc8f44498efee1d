"""Before any process starts: partitions that cannot train stop the run; at run time a
round that aggregated nothing is never `best`; adapters are portable."""

import json
import os
import stat
from types import SimpleNamespace

import pytest
from flwr.app import ArrayRecord

from common.data import heldout_examples
from common.model import BUILTIN_MODEL_HUB_ID, adapter_state, get_model, load_tokenizer
from server import cli
from server.app import RoundHook
from server.checkpoints import RunFolder
from server.strategies import RoundTraffic


@pytest.mark.parametrize("flags, message", [
    (["--partitioner", "dirichlet", "--dirichlet-alpha", "0.001", "--num-clients", "10"],
     "cannot be drawn"),
    (["--partitioner", "iid", "--num-clients", "60"], "use fewer --num-clients"),
    (["--partitioner", "iid", "--num-clients", "2", "--max-length", "12"],
     "held-out: no usable records (8 records: 0 kept, 0 truncated, 8 dropped"),
])
def test_partitions_that_cannot_train_exit_2_before_ray(tiny_cfg, capsys, tmp_path,
                                                         flags, message):
    # the simulation child checks the inputs (server/simulation.py) and exits 2 before
    # it imports Flower's simulation engine: no Ray line, no run folder
    run_dir = tmp_path / "never"
    code = cli.main(["simulate", "--model", tiny_cfg.model, "--dataset", tiny_cfg.dataset,
                     "--categories", "", "--eval-examples", "8", "--run-dir", str(run_dir), *flags])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert out.out.strip() == ""
    assert not run_dir.exists()


def test_a_round_that_aggregated_nothing_is_never_best(tiny_cfg):
    cfg = tiny_cfg
    run = RunFolder.create(cfg)
    model, tokenizer = get_model(cfg), load_tokenizer(cfg.model)
    strategy = SimpleNamespace(traffic=None)
    hook = RoundHook(cfg, run, model, tokenizer, heldout_examples(cfg, cfg.num_clients, tokenizer),
                     strategy)
    hook(0, ArrayRecord(adapter_state(model)))
    strategy.traffic = RoundTraffic(replies=0, failures=2, aggregated=False)
    hook(1, ArrayRecord(adapter_state(model)))
    assert not (run.path / "best").exists()
    assert "no round aggregated" in cli.no_round_aggregated(run.path)


def test_adapters_are_portable_and_readable(tiny_cfg, monkeypatch):
    model = get_model(tiny_cfg)
    run = RunFolder.create(tiny_cfg)
    folder = run.save_adapter(model, 1)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_cfg.model  # a local path, as given
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in folder.iterdir()} == {0o644}
    monkeypatch.setattr(model, "fedtune_model_name", "smollm2-135m-instruct")
    folder = run.save_adapter(model, 2)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BUILTIN_MODEL_HUB_ID


def test_fedtune_data_json_counts_and_marks_the_trained_spans(tiny_cfg, capsys):
    code = cli.main(["data", "--model", tiny_cfg.model, "--dataset", tiny_cfg.dataset,
                     "--categories", "", "--partitioner", "iid", "--num-clients", "2",
                     "--eval-examples", "8", "--max-length", "64", "--show", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert sorted(out["splits"]) == ["client 0", "client 1", "held-out"]
    assert sum(s["records"] for s in out["splits"].values()) == 60
    first = out["examples"][0]
    assert first["where"] == f"'{tiny_cfg.dataset}' line 1" and first["status"] == "kept"
    assert first["text"].endswith("[[Item 0 belongs to alpha and number 0.<|im_end|>\n]]")
    assert "Name item 0 of group alpha." in first["text"].split("[[")[0]


def test_the_run_folder_records_the_preflight_counts(tiny_cfg, monkeypatch, capsys):
    from common.datacheck import DataReport
    from common.records import DataStats
    from server.checkpoints import DATA_STATS_ENV, record_data_stats, share_data_stats

    report = DataReport(splits={"held-out": DataStats(records=3, kept=2, dropped=1,
                                                      dropped_reasons=[("'f' line 2", "too long")],
                                                      lengths=[5, 7])},
                        skipped=(("'f' line 9", "blank"), ("'f' line 11", "blank")))
    monkeypatch.delenv(DATA_STATS_ENV, raising=False)  # restored after the test
    share_data_stats(report.to_json())
    run = RunFolder.create(tiny_cfg)
    record_data_stats(run)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["fedtune: 0 examples truncated, 1 dropped at max-length (see run.log, "
                       "data-stats.json)", "fedtune: 2 records skipped (see run.log)"]
    log = (run.path / "run.log").read_text()
    assert "data | skipped 'f' line 9: blank" in log and "data | skipped 'f' line 11: blank" in log
    assert "data | held-out: dropped 'f' line 2: too long" in log
    saved = json.loads((run.path / "data-stats.json").read_text())
    assert saved["splits"]["held-out"]["tokens-median"] == 6


def test_the_counts_of_a_thousand_clients_still_let_processes_start(tiny_cfg, monkeypatch):
    """The preflight's counts reach the run's processes through a file: as one
    environment variable, 1,000 clients' counts (~150 KB) made every process start fail
    with E2BIG ("Argument list too long"): Ray's daemons, so `fedtune simulate`."""
    import subprocess
    import sys

    from common.datacheck import DataReport
    from common.records import DataStats
    from server.checkpoints import DATA_STATS_ENV, record_data_stats, share_data_stats

    splits = {f"client {i}": DataStats(records=32, kept=32, lengths=list(range(32)))
              for i in range(1000)}
    report = DataReport(splits=splits, skipped=()).to_json()
    assert len(json.dumps(report)) > 131072  # Linux's limit for one environment string
    monkeypatch.delenv(DATA_STATS_ENV, raising=False)
    share_data_stats(report)
    subprocess.run([sys.executable, "-c", "pass"], check=True)  # inherits os.environ
    run = RunFolder.create(tiny_cfg)
    record_data_stats(run)
    recorded = json.loads((run.path / "data-stats.json").read_text())
    assert len(recorded["splits"]) == 1000 and recorded["splits"]["client 999"]["kept"] == 32


def test_a_terminated_simulate_leaves_no_counts_file_and_restores_sigterm(tiny_cfg, monkeypatch,
                                                                          tmp_path):
    """`fedtune simulate` owns the counts' file: SIGTERM (or Ctrl-C) to it stops the run
    through its finally blocks, which remove the file; the child never cleans up (it is
    stopped by a signal, so its exit hooks do not run)."""
    import os
    import signal

    import server.cli as cli
    from common.runtime import DATA_STATS_ENV

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    seen = {}

    def child(cfg, extra_env, *, verbose):
        seen["path"] = extra_env[DATA_STATS_ENV]
        assert os.path.isfile(seen["path"])
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a job scheduler would
        raise AssertionError("SIGTERM did not stop the simulate command")

    monkeypatch.setattr(cli, "_simulate_child", child)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        cli.simulate(tiny_cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not os.path.exists(seen["path"]) and not list(tmp_path.glob("fedtune-data-stats-*"))
    assert signal.getsignal(signal.SIGTERM) is before


def _wait_until_zombie(pid: int, timeout: float = 10.0) -> None:
    """Until /proc/PID/stat shows state Z (the process, or its main thread, has exited)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            if stat.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return
        time.sleep(0.05)
    pytest.fail(f"process {pid} did not become a zombie in {timeout} s")


def test_group_running_ignores_zombies_and_sees_live_members():
    """`fedtune simulate` stops waiting once its group holds only zombies (Ray's actors
    end as zombies until init reaps them): _group_running says False for a zombie that
    ``killpg(pgid, 0)`` still finds, and True while the process runs."""
    import os
    import signal
    import subprocess

    from server.cli import _group_running

    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert _group_running(sleeper.pid)
        os.kill(sleeper.pid, signal.SIGKILL)
        _wait_until_zombie(sleeper.pid)  # a zombie until we reap it, which we do not yet
        os.killpg(sleeper.pid, 0)  # the zombie is still in the group ...
        assert not _group_running(sleeper.pid)  # ... and does not count
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not _group_running(sleeper.pid)


def test_group_running_counts_a_zombie_leader_whose_threads_still_run():
    """A process whose main thread has exited shows state Z in /proc/PID/stat while its
    other threads run (Ray's actors, right after a run, showed 'ZNl'): it still counts,
    so stop_process_group goes on to SIGKILL it instead of returning at once."""
    import os
    import subprocess
    import sys

    from server.cli import _group_running

    code = ("import ctypes, signal, threading, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "threading.Thread(target=lambda: time.sleep(60)).start()\n"
            "ctypes.CDLL('libc.so.6').pthread_exit(None)\n")
    worker = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        _wait_until_zombie(worker.pid)  # its main thread has exited
        assert len(os.listdir(f"/proc/{worker.pid}/task")) > 1
        assert _group_running(worker.pid)
    finally:
        worker.kill()
        worker.wait()


def test_main_in_process_leaves_the_heap_collectable(monkeypatch):
    """Only the console entry (console_main) freezes the heap before exiting; main(),
    which a notebook or wrapper may call in-process, must not (a frozen heap never
    frees its cycles)."""
    import gc

    import server.cli as cli

    gc.unfreeze()
    monkeypatch.setattr("sys.argv", ["fedtune", "simulate", "--num-clients", "0"])
    assert cli.main() == 2
    assert gc.get_freeze_count() == 0
