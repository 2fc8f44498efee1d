import math

import torch

from common.config import RunConfig
from common.data import IGNORE_INDEX, batches_forever, collate, tokenize_example
from common.model import get_model, load_tokenizer
from common.objectives import ProximalTerm, build_objective, causal_lm_loss
from common.train import evaluate, lr_factor, train_steps

MESSAGES = [{"role": "user", "content": "Define the word 'cat' (noun)."},
            {"role": "assistant", "content": "A small domesticated feline."}]


def test_only_response_tokens_are_labelled(tokenizer):
    example = tokenize_example(MESSAGES, tokenizer, max_length=200)
    labels = [t for t in example["labels"] if t != IGNORE_INDEX]
    first = example["labels"].index(labels[0])
    assert all(t == IGNORE_INDEX for t in example["labels"][:first])
    assert tokenizer.decode(labels).startswith("A small domesticated feline.")
    assert "Define the word" in tokenizer.decode(example["input_ids"][:first])
    assert "Define" not in tokenizer.decode(labels)


def test_truncation_keeps_labels_aligned_and_drops_prompt_only(tokenizer):
    full = tokenize_example(MESSAGES, tokenizer, max_length=200)
    prompt_len = full["labels"].index(next(t for t in full["labels"] if t != IGNORE_INDEX))
    cut = tokenize_example(MESSAGES, tokenizer, max_length=prompt_len + 2, truncation="keep-start")
    assert len(cut["input_ids"]) == len(cut["labels"]) == prompt_len + 2
    assert tokenize_example(MESSAGES, tokenizer, max_length=prompt_len,
                            truncation="keep-start") is None
    # the default policy drops an example that does not fit instead of cutting its answer
    assert tokenize_example(MESSAGES, tokenizer, max_length=prompt_len + 2) is None


def test_loss_is_per_sample_mean_of_response_tokens(tiny_cfg, tokenizer):
    model = get_model(tiny_cfg).eval()
    short = tokenize_example(MESSAGES, tokenizer, 200)
    long = tokenize_example([MESSAGES[0], {"role": "assistant",
                                           "content": "A small feline " * 5}], tokenizer, 200)
    batch = collate([short, long], tokenizer.pad_token_id)
    # hand computation: full logits, shift, mean NLL per sequence, mean over sequences
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_seq = []
        for row in range(2):
            lab = batch["labels"][row, 1:]
            nll = torch.nn.functional.cross_entropy(logits[row, :-1], lab, ignore_index=IGNORE_INDEX,
                                                    reduction="sum")
            per_seq.append(nll / (lab != IGNORE_INDEX).sum())
        expected = torch.stack(per_seq).mean()
        got = causal_lm_loss(model, batch)
    assert torch.allclose(got, expected, atol=1e-5)
    # padding and prompt changes do not move the loss: only response tokens count
    stats = evaluate(model, [short], batch_size=1, pad_token_id=tokenizer.pad_token_id)
    assert math.isclose(stats.loss, float(per_seq[0]), rel_tol=1e-5)


def test_proximal_term_matches_hand_computation():
    layer = torch.nn.Linear(3, 2)
    anchor = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        layer.weight.add_(0.5)
    term = ProximalTerm(mu=0.2, anchor=anchor)(layer)
    assert torch.isclose(term, torch.tensor(0.5 * 0.2 * 6 * 0.25))


def _distance_after_training(cfg, tokenizer, mu):
    model = get_model(cfg)
    from common.model import adapter_state, set_adapter_state

    start = adapter_state(model)
    torch.manual_seed(3)
    start = {k: v + 0.01 * torch.randn_like(v) for k, v in start.items()}
    set_adapter_state(model, start)
    examples = [tokenize_example(MESSAGES, tokenizer, 64)] * 8
    batches = batches_forever(examples, 4, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    train_steps(model, batches, build_objective(model, proximal_mu=mu), cfg, num_steps=6)
    end = adapter_state(model)
    return sum(float((end[k] - start[k]).pow(2).sum()) for k in start) ** 0.5


def test_fedprox_keeps_local_weights_closer_to_global(tiny_cfg, tokenizer):
    cfg = tiny_cfg.replace(lr=0.05, lr_schedule="constant", max_grad_norm=0.0)
    plain = _distance_after_training(cfg, tokenizer, mu=0.0)
    prox = _distance_after_training(cfg, tokenizer, mu=50.0)
    assert prox < 0.8 * plain, (prox, plain)


def test_schedule_continues_across_rounds():
    total = 30
    factors = [lr_factor(s, total=total, warmup=0, schedule="cosine") for s in range(total)]
    assert factors[0] == 1.0 and factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    # round 2 of 3 (10 steps each) starts where round 1 ended, not at the peak
    assert lr_factor(10, total=total, warmup=0, schedule="cosine") < 0.8
    assert lr_factor(0, total=total, warmup=5, schedule="constant") == 0.2


# --- L2-SP ---------------------------------------------------------------------------
from common.model import adapter_state, set_adapter_state  # noqa: E402
from common.objectives import (  # noqa: E402
    DistillationLoss, L2SPTerm, distillation_kl, lora_delta_sq_norm,
)


def _randomize_adapter(model, seed=5, scale=0.05):
    torch.manual_seed(seed)
    set_adapter_state(model, {k: scale * torch.randn_like(v) for k, v in adapter_state(model).items()})


def test_l2sp_matches_the_explicit_weight_delta(tiny_cfg):
    from peft.tuners.lora import LoraLayer

    model = get_model(tiny_cfg)
    _randomize_adapter(model)
    expected = torch.zeros(())
    for module in model.modules():
        if isinstance(module, LoraLayer):
            delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
            expected = expected + delta.pow(2).sum()
    assert torch.allclose(lora_delta_sq_norm(model), expected, rtol=1e-5)
    assert torch.allclose(L2SPTerm(0.3)(model), 0.3 * expected, rtol=1e-5)


def _train_from(cfg, tokenizer, start, objective_cfg, steps=4):
    model = get_model(cfg)
    set_adapter_state(model, start)
    torch.manual_seed(0)
    examples = [tokenize_example(MESSAGES, tokenizer, 64)] * 8
    batches = batches_forever(examples, 4, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    train_steps(model, batches, build_objective(model, objective_cfg), cfg, num_steps=steps)
    return adapter_state(model), float(lora_delta_sq_norm(model))


def test_l2sp_weight_zero_is_plain_training_and_positive_weight_shrinks_delta(tiny_cfg, tokenizer):
    cfg = tiny_cfg.replace(lr=0.05, lr_schedule="constant", max_grad_norm=0.0)
    model = get_model(cfg)
    _randomize_adapter(model)
    start = adapter_state(model)
    plain, plain_norm = _train_from(cfg, tokenizer, start, None)
    zero, _ = _train_from(cfg, tokenizer, start, cfg.replace(l2sp_weight=0.0))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    _, l2sp_norm = _train_from(cfg, tokenizer, start, cfg.replace(l2sp_weight=5.0))
    assert l2sp_norm < 0.9 * plain_norm, (l2sp_norm, plain_norm)


# --- distillation --------------------------------------------------------------------
def test_distillation_kl_matches_hand_computation():
    student = torch.tensor([[[1.0, 0.0, -1.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 0.0]]])
    temperature = 2.0
    p_t = torch.softmax(teacher / temperature, -1)
    p_s = torch.softmax(student / temperature, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1)
    assert torch.allclose(distillation_kl(student, teacher, temperature), expected, atol=1e-6)
    assert torch.allclose(distillation_kl(teacher, teacher, temperature), torch.zeros(1, 1), atol=1e-7)


def test_base_model_teacher_starts_at_zero_kl_without_a_copy(tiny_cfg, tokenizer):
    model = get_model(tiny_cfg).eval()
    # LoRA's B starts at zero: student == base == teacher, so only alpha*CE remains
    set_adapter_state(model, {k: (v if "lora_A" in k else torch.zeros_like(v))
                              for k, v in adapter_state(model).items()})
    batch = collate([tokenize_example(MESSAGES, tokenizer, 64)], tokenizer.pad_token_id)
    loss = DistillationLoss(alpha=0.25, temperature=2.0)(model, batch)
    assert torch.allclose(loss, 0.25 * causal_lm_loss(model, batch), atol=1e-6)
    objective = build_objective(model, tiny_cfg.replace(distill_teacher="base"))
    assert objective.task_loss.teacher is None  # the student's own base weights


def test_separate_teacher_is_frozen_through_training(tiny_cfg, tiny_model_dir, tokenizer):
    from common.model import load_teacher

    cfg = tiny_cfg.replace(distill_teacher=str(tiny_model_dir), lr=0.05)
    teacher = load_teacher(cfg)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = get_model(cfg)
    _randomize_adapter(model)
    examples = [tokenize_example(MESSAGES, tokenizer, 64)] * 4
    batches = batches_forever(examples, 2, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    stats = train_steps(model, batches, build_objective(model, cfg), cfg, num_steps=3)
    assert math.isfinite(stats.loss)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_with_another_tokenizer_is_refused(tiny_cfg, tiny_model_dir, tmp_path):
    import shutil

    import pytest
    from transformers import AutoTokenizer

    from common.model import load_teacher

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<not-in-the-student>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="has a different tokenizer than the student"):
        load_teacher(tiny_cfg.replace(distill_teacher=str(other)))


def test_distillation_with_alpha_one_is_plain_training(tiny_cfg, tokenizer):
    """alpha = 1 leaves only the CE term: the same update as no distillation at all."""
    cfg = tiny_cfg.replace(lr=0.05, lr_schedule="constant", max_grad_norm=0.0)
    model = get_model(cfg)
    _randomize_adapter(model)
    start = adapter_state(model)
    plain, _ = _train_from(cfg, tokenizer, start, cfg)
    distilled, _ = _train_from(cfg, tokenizer, start, cfg.replace(distill_teacher="base", distill_alpha=1.0))
    assert all(torch.allclose(plain[k], distilled[k], atol=1e-6) for k in plain)
    pulled, _ = _train_from(cfg, tokenizer, start, cfg.replace(distill_teacher="base", distill_alpha=0.0))
    # alpha = 0: pure distillation toward the base model, whose B is 0 -> a different update
    assert any(not torch.allclose(plain[k], pulled[k], atol=1e-4) for k in plain)
