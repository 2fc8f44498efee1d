"""'optimizer' adamw-schedulefree: the averaged weights leave the loop, no schedule."""

import itertools

import torch

import common.train as train
from common.data import collate
from common.model import adapter_state, get_model, set_adapter_state
from common.objectives import build_objective
from tests.test_accumulation import _examples


def _train(cfg, tokenizer, monkeypatch, *, step_offset=0):
    made = []
    real = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda m, c: made.append(real(m, c)) or made[-1])
    model = get_model(cfg)
    torch.manual_seed(0)
    set_adapter_state(model, {k: 0.05 * torch.randn_like(v) for k, v in adapter_state(model).items()})
    batches = itertools.cycle([collate(_examples(tokenizer)[:4], tokenizer.pad_token_id)])
    train.train_steps(model, batches, build_objective(model), cfg, num_steps=3,
                      step_offset=step_offset)
    return model, made[0]


def test_schedule_free_sends_the_averaged_weights(tiny_cfg, tokenizer, monkeypatch):
    cfg = tiny_cfg.replace(optimizer="adamw-schedulefree", lr=0.01)
    model, optimizer = _train(cfg, tokenizer, monkeypatch)
    assert type(optimizer).__name__ == "AdamWScheduleFree"
    # left in eval mode: the parameters hold x, the average, not y where gradients were taken
    assert optimizer.param_groups[0]["train_mode"] is False
    x = {k: v.clone() for k, v in adapter_state(model).items()}
    optimizer.train()
    y = adapter_state(model)
    assert any(not torch.equal(x[k], y[k]) for k in x), "x and y coincide: nothing was averaged"


def test_schedule_free_ignores_the_lr_schedule(tiny_cfg, tokenizer, monkeypatch):
    # at the end of a cosine schedule AdamW's lr is ~0; schedule-free keeps the peak lr
    cfg = tiny_cfg.replace(optimizer="adamw-schedulefree", lr=0.01, lr_schedule="cosine")
    _, optimizer = _train(cfg, tokenizer, monkeypatch, step_offset=cfg.total_local_steps - 3)
    assert optimizer.param_groups[0]["lr"] == 0.01
    _, adamw = _train(cfg.replace(optimizer="adamw"), tokenizer, monkeypatch,
                      step_offset=cfg.total_local_steps - 3)
    assert adamw.param_groups[0]["lr"] < 0.01
