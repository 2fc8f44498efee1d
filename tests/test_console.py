"""`fedtune simulate`'s terminal: fedtune's lines and real problems; run.log: everything."""

import io

from server.console import OWN_LINE_MARK, ConsoleFilter

# Lines as the demo's simulation child printed them (flwr 1.42, Ray 2.55, transformers 5.24)
DEMO = """\x1b[93mWARNING \x1b[0m:   DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed in a future version of Flower.

            This is a deprecated feature. It will be removed
            entirely in future versions of Flower.
        
/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env var if num_gpus=0
  warnings.warn(
/x/transformers/modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` instead.
  warnings.warn(
\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.
{mark}fedtune: run folder runs/x
\x1b[92mINFO \x1b[0m:      Starting FedAvgLoRA strategy:
\x1b[92mINFO \x1b[0m:      	├── Number of rounds: 3
\x1b[92mINFO \x1b[0m:      Aggregated MetricRecord: {{'train-loss': 3.6}}
(ClientAppActor pid=123) /x/opacus/grad_sample.py:10: UserWarning: a real warning
(ClientAppActor pid=123)   warnings.warn(
\x1b[93mWARNING \x1b[0m:   round 2: rejected the reply of node 7 (norm): too large
(ClientAppActor pid=124) Traceback (most recent call last):
(ClientAppActor pid=124)   File "client/app.py", line 3, in train
(ClientAppActor pid=124) ValueError: partition 3 is empty
\x1b[92mINFO \x1b[0m:      [ROUND 3/3]
{mark}fedtune | round   1 | train loss 3.6
fedtune: warning: plotting failed (OSError: disk full); retry with `fedtune plot runs/x`
""".format(mark=OWN_LINE_MARK)


def run_filter(tmp_path, verbose=False):
    out = io.StringIO()
    console = ConsoleFilter(tmp_path / "run" / "run.log", verbose=verbose, out=out)
    # split on "\n" only, as the pipe does: str.splitlines() also splits at the mark
    lines = [line + "\n" for line in DEMO.split("\n")[:-1]]
    for line in lines[:3]:  # before the run folder exists: held, then written
        console.feed(line)
    (tmp_path / "run").mkdir()
    for line in lines[3:]:
        console.feed(line)
    console.close()
    return out.getvalue().splitlines(), (tmp_path / "run" / "run.log").read_text().splitlines()


def test_terminal_shows_fedtune_lines_and_real_problems_only(tmp_path):
    shown, logged = run_filter(tmp_path)
    assert shown == [
        "fedtune: run folder runs/x",
        "(ClientAppActor pid=123) /x/opacus/grad_sample.py:10: UserWarning: a real warning",
        "(ClientAppActor pid=123)   warnings.warn(",
        "\x1b[93mWARNING \x1b[0m:   round 2: rejected the reply of node 7 (norm): too large",
        "(ClientAppActor pid=124) Traceback (most recent call last):",
        '(ClientAppActor pid=124)   File "client/app.py", line 3, in train',
        "(ClientAppActor pid=124) ValueError: partition 3 is empty",
        "fedtune | round   1 | train loss 3.6",
        "fedtune: warning: plotting failed (OSError: disk full); retry with `fedtune plot runs/x`",
    ]
    # run.log gets every other line (fedtune's own are written there by RunFolder.log),
    # without colour codes
    assert len(logged) == DEMO.count("\n") - 2
    assert logged[0].startswith("WARNING :   DEPRECATED FEATURE") and "Starting FedAvgLoRA" in logged[10]
    assert not any("\x1b" in line or OWN_LINE_MARK in line for line in logged)


def test_verbose_shows_everything(tmp_path):
    shown, _ = run_filter(tmp_path, verbose=True)
    assert len(shown) == DEMO.count("\n")
