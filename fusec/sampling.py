"""Choosing the next token from a model's logits: greedy, or a seeded draw (temperature, top-k)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def sampler(temperature: float, seed: int | None, top_k: int | None) -> Callable[[Tensor], Tensor]:
    """logits [B, vocab] -> next tokens [B]: argmax, or a seeded draw from the tempered distribution."""
    if temperature == 0:
        return lambda logits: logits.argmax(dim=-1)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def sample(logits: Tensor) -> Tensor:
        scaled = logits.double() / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)[:, 0]

    return sample


__all__ = ["sampler"]
