"""Choosing the next token from a model's logits: greedy, or a seeded draw (temperature, top-k, top-p)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor


def sampler(temperature: float, seed: int | None, top_k: int | None,
            top_p: float | None = None) -> Callable[[Tensor], Tensor]:
    """logits [B, vocab] -> next tokens [B]: argmax, or a seeded draw from the tempered distribution,
    restricted to the `top_k` most likely tokens and then to the fewest most likely ones whose
    probabilities sum to at least `top_p` (nucleus sampling; the most likely token always stays)."""
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a probability in (0, 1] (or None for all), given {top_p!r}")
    if temperature == 0:
        return greedy
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
        if top_p is not None and top_p < 1:
            probs, order = torch.softmax(scaled, dim=-1).sort(dim=-1, descending=True)
            before = probs.cumsum(dim=-1) - probs  # the probability of the tokens more likely than each
            drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= top_p)
            scaled = scaled.masked_fill(drop, float("-inf"))
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)[:, 0]

    return sample


def greedy(logits: Tensor) -> Tensor:
    """logits [B, vocab] -> the index of each row's largest logit (the first of equal ones; the first nan,
    as torch's argmax). CPU float32/float64 rows take NumPy's argmax, which is vectorized: torch's took
    ~65 us of CPU for stories15M's 32000 logits (NumPy ~6 us), a twentieth of a decode step."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.argmax(logits.detach().numpy(), axis=-1))
    return logits.argmax(dim=-1)


__all__ = ["greedy", "sampler"]
