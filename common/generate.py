"""Answers from a (LoRA-adapted) chat model, rendered with the tokenizer's chat
template exactly as the training records were."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.precision import autocast


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0: greedy, deterministic
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, sampling: Sampling) -> str:
    """One user turn in, the assistant's reply out (special tokens stripped)."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True)
    options = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if sampling.temperature > 0:
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        # Say so explicitly: a model's generation_config may default to sampling.
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    # Seed per call, so base and fine-tuned answers of --compare draw the same noise.
    torch.manual_seed(sampling.seed)
    model.eval()
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with autocast(model):  # a 16-bit base with fp32 LoRA weights computes in 16 bits
        out = model.generate(**inputs, **options)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def base_and_tuned(model, tokenizer, prompt: str, sampling: Sampling) -> tuple[str, str]:
    """The base model's answer and the adapted one's, from one model copy:
    peft's ``disable_adapter()`` bypasses the LoRA layers for the first call."""
    with model.disable_adapter():
        base = generate(model, tokenizer, prompt, sampling)
    return base, generate(model, tokenizer, prompt, sampling)

