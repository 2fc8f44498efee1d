"""Distillation to a smaller student: the student cut from the teacher's layers, the
teacher given as a run folder (base + adapter, frozen, never in a reply), and the
divergences (forward KL, reverse KL, generalized JSD) against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from common.config import RunConfig
from common.data import batches_forever, collate, tokenize_example
from common.model import adapter_state, get_model, load_base_model, set_adapter_state
from common.objectives import DistillationLoss, build_objective, causal_lm_loss, distillation_divergence
from common.student import (
    RECIPE_FILE, block_influence, ensure_student, keep_layers, load_teacher, similarity_layers,
    spread_layers,
)
from common.train import train_steps
from server.strategies import build_strategy
from tests.test_strategies import FakeGrid

MESSAGES = [{"role": "user", "content": "Define the word 'cat' (noun)."},
            {"role": "assistant", "content": "A small domesticated feline."}]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """Students are built into a fresh FEDTUNE_CACHE, not the user's."""
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory, tokenizer):
    """A tiny 4-layer Llama, so that there are layers to choose between."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-4")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _batch(tokenizer):
    return collate([tokenize_example(MESSAGES, tokenizer, 64)] * 2, tokenizer.pad_token_id)


# --- the student ---------------------------------------------------------------------------
def test_spread_keeps_first_and_last_and_evenly_spaced_layers():
    assert spread_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert spread_layers(4, 4) == [0, 1, 2, 3] and spread_layers(4, 1) == [0]
    with pytest.raises(ValueError, match="student-layers' must be in 1..4"):
        spread_layers(4, 5)


def test_student_with_n_layers_is_a_model_whose_config_says_n(deep_model_dir, tiny_cfg, tokenizer, cache):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg.replace(model=str(deep_model_dir), student_layers=2, student_layer_choice="spread")
    folder = ensure_student(cfg)
    student = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no fedtune
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    assert recipe["kept-layers"] == [0, 3] and recipe["teacher-layers"] == 4
    teacher = load_base_model(str(deep_model_dir))
    # the kept layers are the teacher's layers 0 and 3, embeddings and head shared
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight,
                       teacher.model.layers[3].mlp.down_proj.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert ensure_student(cfg) == folder  # built once: the same folder for every process
    model = get_model(cfg)  # the federation's model is the student with LoRA
    assert len(model.base_model.model.model.layers) == 2
    # generation works: the KV cache is addressed by the renumbered layer_idx
    out = student.generate(**tokenizer("cat", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 1


def test_student_with_the_teachers_depth_reproduces_its_logits_exactly(deep_model_dir, tiny_cfg,
                                                                       tokenizer, cache):
    from transformers import AutoModelForCausalLM

    folder = ensure_student(tiny_cfg.replace(model=str(deep_model_dir), student_layers=4))
    student = AutoModelForCausalLM.from_pretrained(folder).eval()
    teacher = load_base_model(str(deep_model_dir)).eval()
    batch = _batch(tokenizer)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        assert torch.equal(student(**inputs).logits, teacher(**inputs).logits)
    with torch.no_grad():  # and a real cut changes them
        cut = keep_layers(load_base_model(str(deep_model_dir)).eval(), [0, 3])
        assert not torch.allclose(cut(**inputs).logits, teacher(**inputs).logits, atol=1e-3)


def test_similarity_drops_the_layer_that_changes_the_hidden_state_least(deep_model_dir, tokenizer):
    model = load_base_model(str(deep_model_dir)).eval()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    influence = block_influence(model, [_batch(tokenizer)])
    assert influence[2] == pytest.approx(0.0, abs=1e-6)
    assert min(influence[i] for i in (0, 1, 3)) > 1e-4
    assert similarity_layers(influence, 3) == [0, 1, 3]
    assert similarity_layers([0.5, 0.1, 0.3, 0.2], 2) == [0, 2]


def test_explicit_layer_list_and_bad_choices(deep_model_dir, tiny_cfg, cache):
    cfg = tiny_cfg.replace(model=str(deep_model_dir), student_layers=2, student_layer_choice="1,2")
    recipe = json.loads((ensure_student(cfg) / RECIPE_FILE).read_text())
    assert recipe["kept-layers"] == [1, 2]
    with pytest.raises(ValueError, match="lists 3 layers but 'student-layers' is 2"):
        RunConfig(student_layers=2, student_layer_choice="0,1,2")
    with pytest.raises(ValueError, match="student-layer-choice' must be spread, similarity or"):
        RunConfig(student_layers=2, student_layer_choice="every-other")
    with pytest.raises(ValueError, match="outside 0..3"):
        ensure_student(cfg.replace(student_layer_choice="1,7"))


# --- the divergences -------------------------------------------------------------------------
STUDENT = torch.tensor([[[1.0, 0.0, -1.0]]])
TEACHER = torch.tensor([[[0.0, 2.0, 0.0]]])


def _probs(logits, temperature):
    return torch.softmax(logits / temperature, -1)[0, 0].tolist()


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reverse_kl_and_jsd_match_a_hand_computation(temperature):
    p_s, p_t = _probs(STUDENT, temperature), _probs(TEACHER, temperature)
    forward = distillation_divergence(STUDENT, TEACHER, temperature, "forward-kl")
    reverse = distillation_divergence(STUDENT, TEACHER, temperature, "reverse-kl")
    assert forward.item() == pytest.approx(_kl(p_t, p_s), abs=1e-6)
    assert reverse.item() == pytest.approx(_kl(p_s, p_t), abs=1e-6)
    assert forward.item() != pytest.approx(reverse.item(), abs=1e-3)  # KL is not symmetric
    for beta in (0.1, 0.5, 0.9):
        m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
        expected = beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)
        jsd = distillation_divergence(STUDENT, TEACHER, temperature, "jsd", beta)
        assert jsd.item() == pytest.approx(expected, abs=1e-6)
    # beta 0.5 is the symmetric Jensen-Shannon divergence: bounded by log 2
    assert 0 < distillation_divergence(STUDENT, TEACHER, temperature, "jsd", 0.5).item() < math.log(2)


@pytest.mark.parametrize("loss", ["forward-kl", "reverse-kl", "jsd"])
def test_divergence_is_zero_when_student_equals_teacher(loss, tiny_cfg, tokenizer):
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(distillation_divergence(logits, logits.clone(), 2.0, loss),
                          torch.zeros(2, 5), atol=1e-6)
    # through the objective: a teacher identical to the student leaves alpha * CE only
    model = get_model(tiny_cfg).eval()
    teacher = load_base_model(tiny_cfg.model).eval()
    set_adapter_state(model, {k: (v if "lora_A" in k else torch.zeros_like(v))
                              for k, v in adapter_state(model).items()})  # B = 0: student == base
    batch = _batch(tokenizer)
    loss_value = DistillationLoss(alpha=0.25, temperature=2.0, teacher=teacher, loss=loss)(model, batch)
    assert torch.allclose(loss_value, 0.25 * causal_lm_loss(model, batch), atol=1e-5)


def test_distill_config_is_checked():
    with pytest.raises(ValueError, match="distill-loss' must be one of forward-kl"):
        RunConfig(distill_loss="kl")
    with pytest.raises(ValueError, match="distill-beta' must be in \\(0, 1\\)"):
        RunConfig(distill_beta=1.0)
    with pytest.raises(ValueError, match="student-layers' must be >= 0"):
        RunConfig(student_layers=-1)


# --- a teacher given as a run folder ----------------------------------------------------------
def _teacher_run(tiny_cfg, tmp_path):
    """A run folder as fedtune writes it, holding a trained (here: random) adapter."""
    model = get_model(tiny_cfg)
    torch.manual_seed(7)
    set_adapter_state(model, {k: 0.2 * torch.randn_like(v) for k, v in adapter_state(model).items()})
    run = tmp_path / "teacher-run"
    model.save_pretrained(run / "adapters" / "round-1")
    (run / "adapter").symlink_to("adapters/round-1")
    (run / "config.json").write_text(json.dumps(tiny_cfg.to_mapping()))
    (run / "history.jsonl").write_text('{"round": 0}\n')
    return run, adapter_state(model)


def test_teacher_from_a_run_folder_is_base_plus_adapter_and_frozen(tiny_cfg, tokenizer, tmp_path, cache):
    run, teacher_state = _teacher_run(tiny_cfg, tmp_path)
    cfg = tiny_cfg.replace(distill_teacher=str(run), lr=0.05)
    teacher = load_teacher(cfg)
    assert load_teacher(cfg) is teacher  # once per process
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # its logits are the base model's with the teacher's adapter (merged: same up to rounding)
    reference = get_model(tiny_cfg).eval()
    set_adapter_state(reference, teacher_state)
    batch = _batch(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert torch.allclose(teacher(**inputs).logits, reference(**inputs).logits, atol=1e-5)
        assert not torch.allclose(teacher(**inputs).logits,
                                  load_base_model(tiny_cfg.model)(**inputs).logits, atol=1e-3)
    # a student trains against it; the teacher does not move and is no part of the student
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = get_model(cfg.replace(student_layers=1))
    objective = build_objective(student, cfg.replace(student_layers=1))
    assert objective.task_loss.teacher is teacher
    examples = [tokenize_example(MESSAGES, tokenizer, 64)] * 4
    batches = batches_forever(examples, 2, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    train_steps(student, batches, objective, cfg, num_steps=2)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}


def test_student_from_a_run_folder_teacher_starts_from_its_merged_weights(tiny_cfg, tmp_path, cache):
    run, _ = _teacher_run(tiny_cfg, tmp_path)
    cfg = tiny_cfg.replace(distill_teacher=str(run), student_layers=2)  # the tiny model's depth
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(ensure_student(cfg))
    teacher = load_teacher(cfg)
    assert torch.allclose(student.model.layers[1].self_attn.q_proj.weight,
                          teacher.model.layers[1].self_attn.q_proj.weight)
    base = load_base_model(tiny_cfg.model)
    assert not torch.allclose(student.model.layers[1].self_attn.q_proj.weight,
                              base.model.layers[1].self_attn.q_proj.weight, atol=1e-4)


def test_a_clients_reply_holds_the_students_adapter_only(tiny_cfg, tmp_path, cache, flower_identity):
    """The real ClientApp train() with a run-folder teacher and a 1-layer student: the
    reply's arrays are exactly the student's LoRA tensors, none of the teacher's weights."""
    from client.app import train

    run, _ = _teacher_run(tiny_cfg, tmp_path)
    cfg = tiny_cfg.replace(distill_teacher=str(run), student_layers=1, distill_loss="jsd",
                           student_train="lora")
    student = get_model(cfg)
    expected = {k: tuple(v.shape) for k, v in adapter_state(student).items()}
    assert all("lora_" in k for k in expected)
    strategy = build_strategy(cfg)
    msg = next(iter(strategy.configure_train(1, ArrayRecord(adapter_state(student)),
                                             ConfigRecord(), FakeGrid([1, 2]))))
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=cfg.to_mapping(),
                      node_config={"partition-id": 0, "num-partitions": 2})
    reply = train(msg, context)
    arrays = reply.content["arrays"]
    assert {k: tuple(a.shape) for k, a in arrays.items()} == expected
    teacher = load_teacher(cfg)
    teacher_numel = sum(p.numel() for p in teacher.parameters())
    assert sum(a.numpy().size for a in arrays.values()) < teacher_numel / 10
    assert math.isfinite(reply.content["metrics"]["train-loss"])
