"""A Llama decoder block in plain PyTorch: the reference model fusec compiles and checks itself against.

The block follows the HF `transformers` Llama layout (rotate-half RoPE, grouped-query attention, SwiGLU MLP),
with llama2.c-style parameter names (`attention.wq.weight`, `feed_forward.w1.weight`, ...). Everything is
written so it traces to a static graph: the causal mask is built from `torch.arange` comparisons inside
`forward`, and the RoPE tables are sliced with Python ints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class LlamaConfig:
    """Shape of one Llama decoder block (plus the whole-model fields a preset records for reference)."""

    dim: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    vocab_size: int = 32000
    n_layers: int = 1
    # Switches for Llama-family architectures (fusec/models/architectures.py maps HF configs onto them);
    # the defaults are Llama's.
    head_size: int | None = None        # width of one head when it is not dim // n_heads (Gemma)
    qkv_bias: bool = False              # biases on the q, k and v projections (Qwen2)
    sliding_window: int | None = None   # a query sees only the keys of its last `sliding_window` positions
    embed_scale: float = 1.0            # embeddings are multiplied by this (Gemma: sqrt(dim))
    activation: str = "silu"            # the MLP's gate: "silu" (SwiGLU), "gelu_tanh" or "gelu" (GeGLU, Gemma)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LlamaConfig: activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"given {self.activation!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"LlamaConfig: sliding_window must be a positive number of positions or None, "
                             f"given {self.sliding_window}")
        if self.head_size is None and self.dim % self.n_heads:
            raise ValueError(f"LlamaConfig: dim must be divisible by n_heads, "
                             f"expected a multiple of {self.n_heads}, given dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads must be divisible by n_kv_heads, "
                             f"expected a divisor of {self.n_heads}, given n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            # RoPE rotates pairs of channels, so each head needs an even width.
            raise ValueError(f"LlamaConfig: head_dim (dim // n_heads) must be even, given {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @classmethod
    def tiny(cls) -> LlamaConfig:
        """A few-thousand-parameter block for fast tests; still exercises GQA (4 query heads, 2 KV heads)."""
        return cls(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128)

    @classmethod
    def stories15M(cls) -> LlamaConfig:  # noqa: N802 (the checkpoint's own name)
        """Karpathy's TinyStories 15M model (llama2.c)."""
        return cls(dim=288, n_heads=6, n_kv_heads=6, hidden_dim=768, max_seq_len=256, n_layers=6)

    @classmethod
    def tinyllama_1b(cls) -> LlamaConfig:
        """TinyLlama-1.1B: the realistic GQA shape (32 query heads sharing 4 KV heads)."""
        return cls(dim=2048, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048, n_layers=22)

    @classmethod
    def llama2_7b(cls) -> LlamaConfig:
        """Llama-2-7B (Touvron et al. 2023): the SN40L paper's fusion benchmark (§VI-A, Llama2-7B 4K).
        One block is ~202M parameters (0.8 GB in float32): tracing it on the CPU is fine."""
        return cls(dim=4096, n_heads=32, n_kv_heads=32, hidden_dim=11008, max_seq_len=4096, n_layers=32)

    @classmethod
    def preset(cls, name: str) -> LlamaConfig:
        """The preset config called `name`; ValueError listing the valid names if there is none."""
        if name not in PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return PRESETS[name]()


PRESETS: dict[str, Callable[[], LlamaConfig]] = {
    "tiny": LlamaConfig.tiny,
    "stories15M": LlamaConfig.stories15M,
    "tinyllama_1b": LlamaConfig.tinyllama_1b,
    "llama2_7b": LlamaConfig.llama2_7b,
    # llama2.c's larger TinyStories models (Karpathy): whole-model generation benchmarks (fusec/generate.py).
    "stories42M": lambda: LlamaConfig(dim=512, n_heads=8, n_kv_heads=8, hidden_dim=1376, max_seq_len=1024,
                                      n_layers=8),
    "stories110M": lambda: LlamaConfig(dim=768, n_heads=12, n_kv_heads=12, hidden_dim=2048, max_seq_len=1024,
                                       n_layers=12),
}


ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # the gate of FeedForward: SiLU, GELU (tanh approximation), GELU


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: x * rsqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Low-precision inputs lose too much in the mean of squares, so normalise in float32.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape [max_seq_len, head_dim] in the HF layout (the frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    positions = torch.arange(max_seq_len, dtype=torch.float32, device="cpu")
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1).numpy().astype(np.float64)
    # cos/sin by NumPy in float64, rounded once to float32: torch's cos/sin may differ in the last bit from
    # one process to the next, which would make the tables (buffers, folded into the program, and covered
    # by the trace cache's key) differ between runs of the same model. Computed on the CPU, then placed on
    # the default device (a model built on "meta" gets meta tables, as torch's own ops would give it).
    device = torch.get_default_device()
    return (torch.from_numpy(np.cos(angles).astype(np.float32)).to(device),
            torch.from_numpy(np.sin(angles).astype(np.float32)).to(device))


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last axis: the rotation RoPE pairs channel i with channel i + d/2 by."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, head_dim] by the angles in cos/sin [T, head_dim] (they broadcast over B and H)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """k (after RoPE) and v of x [B, T, dim], each [B, n_kv_heads, T, head_dim]: what a KV cache holds."""
        batch, seq_len, _ = x.shape
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor | None = None,
                past_v: Tensor | None = None) -> Tensor:
        """x [B, T, dim] at the positions cos/sin describe; past_k/past_v [B, n_kv_heads, T_past, head_dim]
        hold the keys and values of the T_past tokens before them (or are both None)."""
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        if past_k is not None and past_v is not None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        past_len, total_len = k.shape[2] - seq_len, k.shape[2]

        # Grouped-query attention: query heads [g*r, (g+1)*r) all read KV head g.
        repeats = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)

        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        # Query i sits at position past_len + i and sees every key at a position up to its own.
        query_index = torch.arange(past_len, total_len, device=x.device).view(seq_len, 1)
        key_index = torch.arange(total_len, device=x.device).view(1, total_len)
        scores = scores.masked_fill(hidden_keys(key_index, query_index, self.sliding_window), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).type_as(q)

        out = (probs @ v).transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.wo(out)


def hidden_keys(key_index: Tensor, query_index: Tensor, sliding_window: int | None = None) -> Tensor:
    """True where a query may not see a key, from their positions (broadcast against each other): keys
    after the query, and with a sliding window W the keys W or more positions before it (as transformers'
    sliding-window mask: a query at q sees the keys at q-W+1..q)."""
    hidden = key_index > query_index
    if sliding_window is not None:
        hidden = hidden | (key_index <= query_index - sliding_window)
    return hidden


class FeedForward(nn.Module):
    """Gated MLP: w2(act(w1 x) * w3 x), act silu (SwiGLU, the default) or tanh-approximated GELU."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.activation = activation  # a name, not a function: the module stays picklable

    def forward(self, x: Tensor) -> Tensor:
        gate = self.w1(x)
        gate = (nn.functional.silu(gate) if self.activation == "silu" else
                nn.functional.gelu(gate, approximate="tanh" if self.activation == "gelu_tanh" else "none"))
        return self.w2(gate * self.w3(x))


class LlamaBlock(nn.Module):
    """One pre-norm Llama decoder block: x + attention(norm(x)), then h + feed_forward(norm(h))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim, config.activation)
        # Non-persistent: the tables derive from the config, so they stay out of state_dict.
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor, start_pos: int = 0, past_k: Tensor | None = None,
                past_v: Tensor | None = None) -> Tensor:
        """x [B, T, dim] at positions start_pos .. start_pos+T-1 -> [B, T, dim].

        With past_k/past_v [B, n_kv_heads, T_past, head_dim] (the keys after RoPE and the values of the
        T_past earlier tokens), x sits at positions T_past .. T_past+T-1 and attends to the past as well;
        start_pos must then be T_past or left at 0.
        """
        start_pos = self._check_past(x, start_pos, past_k, past_v)
        cos, sin = self._rope(start_pos, x.shape[1])
        h = x + self.attention(self.attention_norm(x), cos, sin, past_k, past_v)
        return h + self.feed_forward(self.ffn_norm(h))

    def kv(self, x: Tensor, start_pos: int = 0) -> tuple[Tensor, Tensor]:
        """The (k, v) this block's attention computes for x at positions start_pos..: a KV cache for x."""
        cos, sin = self._rope(start_pos, x.shape[1])
        return self.attention.project_kv(self.attention_norm(x), cos, sin)

    def _rope(self, start_pos: int, seq_len: int) -> tuple[Tensor, Tensor]:
        if start_pos + seq_len > self.config.max_seq_len:
            raise ValueError(f"LlamaBlock: positions up to {self.config.max_seq_len} are supported, "
                             f"given start_pos={start_pos} with {seq_len} tokens")
        return self.rope_cos[start_pos:start_pos + seq_len], self.rope_sin[start_pos:start_pos + seq_len]

    def _check_past(self, x: Tensor, start_pos: int, past_k: Tensor | None, past_v: Tensor | None) -> int:
        """The start position of x: start_pos, or T_past when a past is given (ValueError on a conflict)."""
        if past_k is None and past_v is None:
            return start_pos
        if past_k is None or past_v is None:
            raise ValueError("LlamaBlock: past_k and past_v must be given together, "
                             f"given past_k={_shape(past_k)} and past_v={_shape(past_v)}")
        config = self.config
        want = (x.shape[0], config.n_kv_heads, past_k.shape[2], config.head_dim)
        if tuple(past_k.shape) != want or tuple(past_v.shape) != want:
            raise ValueError(f"LlamaBlock: past_k and past_v must have shape [B, n_kv_heads, T_past, head_dim]"
                             f" = {list(want)}, given {_shape(past_k)} and {_shape(past_v)}")
        past_len = past_k.shape[2]
        if start_pos not in (0, past_len):
            raise ValueError(f"LlamaBlock: with a past of {past_len} tokens start_pos must be {past_len} "
                             f"(or 0), given start_pos={start_pos}")
        return past_len


def _shape(x: Tensor | None) -> str:
    return "None" if x is None else str(list(x.shape))


def init_weights(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic random init of every Linear and RMSNorm in `module`, in place; returns `module`.

    Norm weights get 1 + noise rather than exactly 1, so a backend that drops the norm scale fails tests.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for submodule in module.modules():  # registration order, so the draw order is fixed
            if isinstance(submodule, nn.Linear):
                submodule.weight.copy_(torch.randn(submodule.weight.shape, generator=generator) * 0.02)
                if submodule.bias is not None:
                    submodule.bias.zero_()
            elif isinstance(submodule, RMSNorm):
                submodule.weight.copy_(1.0 + 0.1 * torch.randn(submodule.weight.shape, generator=generator))
    return module


def example_inputs(config: LlamaConfig, batch: int = 1, seq_len: int = 16, seed: int = 0) -> tuple[Tensor]:
    """`(x,)` with x a seeded standard-normal float32 tensor of shape [batch, seq_len, config.dim]."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq_len, config.dim, generator=generator, dtype=torch.float32),)
