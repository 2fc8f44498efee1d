"""Gradient accumulation weighs every example of a step the same."""

import torch

import common.train as train
from common.data import collate, tokenize_example
from common.model import adapter_state, get_model, set_adapter_state
from common.objectives import build_objective


def _examples(tokenizer):
    # answers of different lengths, so per-example losses differ
    return [tokenize_example([{"role": "user", "content": f"Count to {i}."},
                              {"role": "assistant", "content": " ".join(map(str, range(i + 1)))}],
                             tokenizer, 96) for i in range(10)]


def _one_step(cfg, tokenizer, start, sizes, monkeypatch):
    """Adapter after one plain SGD step (lr 1: the update is minus the gradient)."""
    model = get_model(cfg)
    set_adapter_state(model, start)
    monkeypatch.setattr(train, "make_optimizer", lambda m, c: torch.optim.SGD(
        [p for p in m.parameters() if p.requires_grad], lr=1.0))
    examples, chunks, at = _examples(tokenizer), [], 0
    for size in sizes:
        chunks.append(collate(examples[at:at + size], tokenizer.pad_token_id))
        at += size
    stats = train.train_steps(model, iter(chunks), build_objective(model), cfg.replace(
        grad_accum=len(sizes)), num_steps=1)
    return adapter_state(model), stats.loss


def test_batch_of_10_equals_4_4_2_accumulated(tiny_cfg, tokenizer, monkeypatch):
    cfg = tiny_cfg.replace(lr=1.0, lr_schedule="constant", max_grad_norm=0.0, weight_decay=0.0)
    model = get_model(cfg)
    torch.manual_seed(1)
    start = {k: 0.05 * torch.randn_like(v) for k, v in adapter_state(model).items()}
    whole, whole_loss = _one_step(cfg, tokenizer, start, [10], monkeypatch)
    accumulated, accumulated_loss = _one_step(cfg, tokenizer, start, [4, 4, 2], monkeypatch)
    assert abs(whole_loss - accumulated_loss) < 1e-5 * abs(whole_loss)
    moved = sum(float((whole[k] - start[k]).abs().sum()) for k in start)
    assert moved > 0
    for key in start:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-6)


def test_weights_are_example_shares():
    labels = [torch.tensor([[1, -100], [2, 3], [-100, -100]]), torch.tensor([[5, 6]])]
    # the all-ignored row does not count, as in per_sample_mean
    assert train.accumulation_weights([{"labels": lab} for lab in labels]) == [2 / 3, 1 / 3]
    assert train.accumulation_weights([{"labels": torch.tensor([0, 1, 1])}]) == [1.0]
