"""'student-train mlp': the student's MLPs and norms train in full (peft modules_to_save),
and exactly what trains travels: no frozen weight, nothing of the teacher. Tiny random
models: behaviour only, never results (docs/distillation.md has those)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from common.adapters import attach_adapter
from common.config import RunConfig
from common.data import collate, tokenize_example
from common.model import adapter_state, get_model, load_base_model, set_adapter_state, trainable_parameters
from common.student import ensure_student, load_teacher
from server.strategies import build_strategy
from tests.test_distill import MESSAGES, _teacher_run, cache  # noqa: F401 - fixture
from tests.test_strategies import FakeGrid


def _wire_name(param_name: str) -> str:
    """A trainable parameter's name as peft's state dict (and so the wire) names it."""
    return param_name.replace("modules_to_save.default.", "").replace(".default.", ".")


def test_mlp_student_trains_mlps_and_norms_in_full_and_lora_elsewhere(tiny_cfg, tmp_path, cache):
    run, _ = _teacher_run(tiny_cfg, tmp_path)
    cfg = tiny_cfg.replace(distill_teacher=str(run), student_layers=1, student_train="mlp")
    trainable = trainable_parameters(get_model(cfg))
    full = {n for n in trainable if ".modules_to_save." in n}
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in full} == {
        "mlp", "input_layernorm", "post_attention_layernorm", "norm"}
    lora = set(trainable) - full
    assert lora and all(".self_attn." in n and ".lora_" in n for n in lora)  # none inside the MLP
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)  # tied: frozen
    # the LoRA-only student trains a small fraction of that
    lora_cfg = cfg.replace(student_train="lora")
    assert sum(p.numel() for p in trainable_parameters(get_model(lora_cfg)).values()) < \
        sum(p.numel() for p in trainable.values()) / 2


def test_an_mlp_students_reply_is_exactly_its_trainable_weights(tiny_cfg, tmp_path, cache,
                                                               flower_identity):
    """The real ClientApp train(): the reply holds one array per trainable parameter of the
    student, with its trained value, and nothing else (no frozen weight, no teacher)."""
    from client.app import train

    run, _ = _teacher_run(tiny_cfg, tmp_path)
    cfg = tiny_cfg.replace(distill_teacher=str(run), student_layers=1, student_train="mlp",
                           lr=0.05)
    student = get_model(cfg)
    before = adapter_state(student)
    strategy = build_strategy(cfg)
    msg = next(iter(strategy.configure_train(1, ArrayRecord(before), ConfigRecord(),
                                             FakeGrid([1, 2]))))
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=cfg.to_mapping(),
                      node_config={"partition-id": 0, "num-partitions": 2})
    arrays = train(msg, context).content["arrays"]
    trainable = {_wire_name(n): p for n, p in trainable_parameters(student).items()}
    assert set(arrays.keys()) == set(trainable)
    for name, param in trainable.items():
        sent = torch.from_numpy(arrays[name].numpy())
        assert torch.equal(sent, param.detach().cpu()), name  # what trained is what is sent
    moved = [n for n in trainable if ".mlp." in n and not torch.equal(
        torch.from_numpy(arrays[n].numpy()), before[n])]
    assert moved  # the full MLP weights trained and travel
    teacher = load_teacher(cfg)
    assert sum(a.numpy().size for a in arrays.values()) < sum(p.numel() for p in teacher.parameters())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}


def test_a_saved_mlp_student_reloads_and_merges_to_the_same_logits(tiny_cfg, tokenizer, tmp_path,
                                                                  cache):
    """Run folder round trip (save_pretrained, then the tools' attach_adapter) and export
    (merge_and_unload): the trained full MLP weights come back, not the cut teacher's."""
    run, _ = _teacher_run(tiny_cfg, tmp_path)
    cfg = tiny_cfg.replace(distill_teacher=str(run), student_layers=1, student_train="mlp")
    student = get_model(cfg)
    torch.manual_seed(3)
    set_adapter_state(student, {k: v + 0.1 * torch.randn_like(v)
                                for k, v in adapter_state(student).items()})
    folder = tmp_path / "saved"
    student.save_pretrained(folder)
    batch = collate([tokenize_example(MESSAGES, tokenizer, 64)] * 2, tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    source = str(ensure_student(cfg))
    with torch.no_grad():
        expected = student.eval()(**inputs).logits
        loaded = attach_adapter(load_base_model(source), folder, model_name=source)
        assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-5)
        merged = loaded.merge_and_unload()
        assert torch.allclose(merged(**inputs).logits, expected, atol=1e-5)
        assert not torch.allclose(load_base_model(source)(**inputs).logits, expected, atol=1e-3)


def test_student_train_config_is_checked():
    with pytest.raises(ValueError, match="'student-train' must be one of auto, lora, mlp"):
        RunConfig(student_train="full")
    with pytest.raises(ValueError, match="needs 'student-layers' > 0"):
        RunConfig(student_train="mlp")
    with pytest.raises(ValueError, match="needs lora-aggregation naive"):
        RunConfig(student_train="mlp", student_layers=2, lora_aggregation="exact")
    with pytest.raises(ValueError, match="not supported with dp-sgd"):
        RunConfig(student_train="mlp", student_layers=2, dp_sgd=True, dp_noise_multiplier=1.0)
    RunConfig(student_train="mlp", student_layers=2)  # the valid combination parses


def test_student_train_auto_is_mlp_for_a_student_where_it_is_supported():
    assert RunConfig(student_layers=2).trains_student_mlp
    assert not RunConfig().trains_student_mlp  # no student: LoRA as always
    assert not RunConfig(student_layers=2, student_train="lora").trains_student_mlp
    assert not RunConfig(student_layers=2, lora_aggregation="exact").trains_student_mlp
    assert not RunConfig(student_layers=2, dp_sgd=True, dp_noise_multiplier=1.0).trains_student_mlp
