"""The tools around a finished run: run folder extras (best, run.log, TensorBoard),
evaluate, generate, export and plot, on the tiny model and a hand-built run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord

from common.data import heldout_examples, tokenize_example, to_messages
from common.model import adapter_state, get_model, load_tokenizer
from server.app import RoundHook
from server.checkpoints import RunFolder
from server.cli import main
from server.strategies import RoundTraffic
from server.tracking import CLIENT_TAG, TAGS

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scaled_adapter(model, seed: int, scale: float) -> dict:
    """Random LoRA tensors: B != 0, so the adapter really changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * scale for k, v in adapter_state(model).items()}


def run_rounds(cfg, states):
    """Drive the ServerApp's RoundHook as Strategy.start does: round 0, then one per state."""
    run = RunFolder.create(cfg)
    model, tokenizer = get_model(cfg), load_tokenizer(cfg.model)
    strategy = SimpleNamespace(traffic=None)
    hook = RoundHook(cfg, run, model, tokenizer, heldout_examples(cfg, cfg.num_clients, tokenizer),
                     strategy)
    hook(0, ArrayRecord(adapter_state(model)))
    for server_round, state in enumerate(states, start=1):
        strategy.traffic = RoundTraffic(bytes_sent=1000 * server_round, bytes_received=900, replies=2,
                                        clients=[{"round": server_round, "node-id": 7 + p,
                                                  "partition-id": p, "train-loss": 3.0 - 0.1 * p,
                                                  "num-examples": 10} for p in (0, 1)])
        hook(server_round, ArrayRecord(state))
    return run


@pytest.fixture()
def tiny_run(tiny_cfg):
    """A finished 2-round run folder: round 1 a mild adapter, round 2 a ruinous one."""
    model = get_model(tiny_cfg)
    return run_rounds(tiny_cfg, [scaled_adapter(model, 1, 0.3), scaled_adapter(model, 2, 30.0)])


def fedtune(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# --- run folder ------------------------------------------------------------------------
def test_best_points_at_lowest_eval_loss_and_run_log_keeps_round_lines(tiny_run):
    history = tiny_run.history()
    assert history[2]["eval-loss"] > history[1]["eval-loss"], "round 2's adapter should be worse"
    assert os.readlink(tiny_run.path / "best") == "adapters/round-1"
    assert os.readlink(tiny_run.path / "adapter") == "adapters/round-2"
    log_lines = (tiny_run.path / "run.log").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in log_lines] == ["round   0", "round   1", "round   2"]


def test_tensorboard_events_hold_the_history(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg.replace(tensorboard=True)
    run = run_rounds(cfg, [scaled_adapter(get_model(cfg), 1, 0.3)])
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    dp_only = {"privacy/epsilon", "privacy/client_epsilon"}  # written by DP runs only
    expected = (set(TAGS.values()) - dp_only) | {CLIENT_TAG.format(client=f"partition-{p}") for p in (0, 1)}
    assert expected <= set(events.Tags()["scalars"])
    history = run.history()
    eval_loss = events.Scalars(TAGS["eval-loss"])
    assert [e.step for e in eval_loss] == [0, 1]
    assert [e.value for e in eval_loss] == pytest.approx([r["eval-loss"] for r in history], rel=1e-6)
    assert [e.step for e in events.Scalars(TAGS["train-loss"])] == [1]  # round 0 trains nothing
    assert events.Scalars(TAGS["bytes-sent"])[0].value == pytest.approx(1000 / 1e6)


def test_no_tensorboard_folder_by_default(tiny_run):
    assert not (tiny_run.path / "tensorboard").exists()


# --- evaluate --------------------------------------------------------------------------
@pytest.mark.parametrize("with_adapter", [True, False])
def test_evaluate_matches_a_hand_computation(with_adapter, tiny_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    records = [{"instruction": f"Say {w}.", "output": f"{w} {w}, and {w} again."}
               for w in ("alpha", "beta gamma", "delta")]
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    model_args = (["--adapter", str(tiny_run.path), "--round", "1"] if with_adapter
                  else ["--model", str(tiny_model_dir), "--dtype", "float32"])  # exact math
    code = main(["evaluate", *model_args, "--dataset", str(data), "--eval-examples", "3",
                 "--batch-size", "2", "--json"])
    assert code == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if with_adapter:
        model = PeftModel.from_pretrained(model, tiny_run.path / "adapters" / "round-1").eval()
    nll, correct, count = 0.0, 0, 0
    for record in records:  # one unpadded sequence at a time, full logits
        ex = tokenize_example(to_messages(record, "instruction"), tokenizer, 96)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        for pos in range(1, len(ex["input_ids"])):  # logits at pos-1 predict token pos
            if ex["labels"][pos] != -100:
                nll -= float(logprobs[pos - 1, ex["labels"][pos]])
                correct += int(logits[pos - 1].argmax()) == ex["labels"][pos]
                count += 1
    assert got["examples"] == 3 and got["tokens"] == count
    assert got["loss"] == pytest.approx(nll / count, abs=1e-4)
    assert got["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)
    assert got["token-accuracy"] == pytest.approx(correct / count)


def test_evaluate_run_folder_defaults_to_its_heldout_split(tiny_run, capsys):
    assert main(["evaluate", "--adapter", str(tiny_run.path / "best"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    round1 = tiny_run.history()[1]
    assert got["data"] == "the run's held-out split"
    assert got["loss"] == pytest.approx(round1["eval-loss"], rel=1e-5)
    assert got["token-accuracy"] == pytest.approx(round1["eval-token-accuracy"])


def test_num_threads_sets_torchs_threads(tiny_run, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            assert main(["evaluate", "--adapter", str(tiny_run.path), "--json",
                         "--num-threads", str(threads)]) == 0
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


# --- generate --------------------------------------------------------------------------
def test_compare_gives_the_base_models_answer_from_one_copy(tiny_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.adapters import attach_adapter
    from common.generate import Sampling, base_and_tuned, generate

    tokenizer = load_tokenizer(str(tiny_model_dir))
    greedy = Sampling(max_new_tokens=8)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           tiny_run.path / "adapters" / "round-2", model_name="tiny")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          tiny_run.path / "adapters" / "round-2")
    base_answer, tuned_answer = base_and_tuned(tuned, tokenizer, "Say hi.", greedy)
    assert base_answer == generate(plain, tokenizer, "Say hi.", greedy)
    assert tuned_answer == generate(reference, tokenizer, "Say hi.", greedy)
    assert base_answer != tuned_answer
    sampled = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert generate(tuned, tokenizer, "Say hi.", sampled) == generate(tuned, tokenizer, "Say hi.", sampled)


def test_generate_cli_reads_a_prompts_file_and_labels_answers(tiny_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First prompt.\n\nSecond prompt.\n")
    code = main(["generate", "--adapter", str(tiny_run.path), "--prompts-file", str(prompts),
                 "--compare", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("> ") == 2 and "> Second prompt." in out
    assert out.count("base:       ") == 2 and out.count("fine-tuned: ") == 2


# --- export ----------------------------------------------------------------------------
def test_export_merges_into_a_plain_model_with_equal_logits(tiny_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    assert main(["export", "--adapter", str(tiny_run.path), "--round", "1", "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044, "export must be readable by others"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          tiny_run.path / "adapters" / "round-1").eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 60, 700]])
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3, "the adapter should change the logits"
    assert (got - want).abs().max() < 1e-5


# --- plot ------------------------------------------------------------------------------
def test_plot_writes_valid_pngs(tiny_run):
    from PIL import Image

    from server.plots import plot_run

    paths = plot_run(tiny_run.path)
    assert sorted(p.name for p in paths) == ["clients.png", "loss.png", "perplexity.png", "traffic.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5000, path
        with Image.open(path) as image:
            image.verify()


def test_epsilon_plot_appears_when_the_history_has_epsilon(tiny_run):
    from PIL import Image

    from server.plots import plot_run

    history = tiny_run.history()
    for row, epsilon in zip(history, (None, 0.8, 1.3)):  # round 0 trains nothing: no epsilon
        row["epsilon"] = epsilon
    (tiny_run.path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    paths = plot_run(tiny_run.path)
    assert [p.name for p in paths][-1] == "epsilon.png"
    assert paths[-1].read_bytes()[:8] == PNG_SIGNATURE and paths[-1].stat().st_size > 5000
    with Image.open(paths[-1]) as image:
        image.verify()


def test_no_epsilon_plot_for_an_empty_epsilon_column(tiny_run):
    from server.plots import plot_run

    history = [dict(row, epsilon=None) for row in tiny_run.history()]
    (tiny_run.path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    assert "epsilon.png" not in [p.name for p in plot_run(tiny_run.path)]


def test_failed_plot_warns_but_the_run_still_succeeds(tmp_path, capsys):
    from server.summary import plot_after_run

    plot_after_run(tmp_path)  # no history.jsonl: plotting fails
    err = capsys.readouterr().err
    assert "warning: plotting failed" in err and f"fedtune plot {tmp_path}" in err


# --- bad input -------------------------------------------------------------------------
def _mixed_rank_adapter(tiny_run, tiny_cfg, tmp_path) -> Path:
    """The run's r=4 adapter_config.json next to tensors of an r=8 adapter."""
    other = tmp_path / "r8"
    get_model(tiny_cfg.replace(lora_r=8)).save_pretrained(other)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_run.path / "adapters" / "round-1", mixed)
    shutil.copy(other / "adapter_model.safetensors", mixed / "adapter_model.safetensors")
    return mixed


@pytest.mark.parametrize("case, message", [
    ("missing", "adapter '{tmp}/nope' does not exist"),
    ("mixed-rank", "does not fit model"),
])
def test_bad_adapter_is_one_line_and_exit_2(case, message, tiny_run, tiny_cfg, tmp_path):
    adapter = tmp_path / "nope" if case == "missing" else _mixed_rank_adapter(tiny_run, tiny_cfg, tmp_path)
    result = fedtune("evaluate", "--adapter", str(adapter), "--model", tiny_cfg.model,
                     "--dataset", tiny_cfg.dataset, "--eval-examples", "2")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: "), result.stderr[-2000:]
    assert message.format(tmp=tmp_path) in lines[0]
    if case == "mixed-rank":
        assert "was the LoRA rank the same?" in lines[0]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--adapter", "{run}", "--round", "9"], "has no round 9; it holds rounds 1, 2"),
    (["evaluate", "--adapter", "{run}", "--eval-examples", "4"], "--eval-examples needs --dataset"),
    (["evaluate", "--adapter", "{tmp}"], "is neither a fedtune run folder"),
    (["generate", "--adapter", "{run}"], "give --prompt TEXT or --prompts-file FILE"),
    (["generate", "--prompt", "hi", "--compare"], "--compare needs --adapter"),
    (["generate", "--adapter", "{run}", "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["export", "--adapter", "{run}", "--out", "{run}"], "already exists: choose another --out"),
    (["plot", "{tmp}/none"], "run folder '{tmp}/none' does not exist"),
    (["evaluate", "--adapter", "{run}", "--num-threads", "0"], "--num-threads 0: give a whole number"),
])
def test_tool_errors_are_one_line_and_exit_2(argv, message, tiny_run, tmp_path, capsys):
    fill = lambda s: s.format(run=tiny_run.path, tmp=tmp_path)  # noqa: E731
    assert main([fill(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedtune: error: ") and fill(message) in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["export", "--adapter", "x"], "the following arguments are required: --out; see `fedtune export --help`"),
    (["evaluate", "--round", "two"], "argument --round: invalid int value: 'two'"),
    (["evaluate", "--adaptr", "x"], "unknown option '--adaptr'; did you mean '--adapter'?"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("fedtune: error: ") and message in err[0], err
