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
    cut = tokenize_example(MESSAGES, tokenizer, max_length=prompt_len + 2)
    assert len(cut["input_ids"]) == len(cut["labels"]) == prompt_len + 2
    assert tokenize_example(MESSAGES, tokenizer, max_length=prompt_len) is None


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
