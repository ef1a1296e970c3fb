"""Routers: map a prompt's token ids to the one expert that should answer it.

`KeywordRouter` counts hand-picked keywords (no training, fully explainable). `EmbeddingBagRouter` is a
small trainable classifier (mean token embedding -> linear -> softmax); `train_router` fits it and returns
a `CompiledRouter`, which runs it through `fusec.compile` so routing costs tens of microseconds next to
the expert's generation. `synthetic_prompts` makes labelled prompts for benchmarks, demos and tests.
"""
from __future__ import annotations

import json
import numbers
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import fusec

FORMAT = "fusec.coe.router/1"


@dataclass(frozen=True)
class Route:
    """A router's decision: the expert, its probability, every expert's probability and who decided."""

    expert: str
    confidence: float           # probability of `expert`, 0..1 (0.0: the default expert, no evidence)
    scores: dict[str, float]    # probability per expert, summing to 1
    router: str                 # "keyword", "embedding-bag (fusec numba)", ...


def token_list(prompt_ids, vocab_size: int | None = None, what: str = "prompt") -> list[int]:
    """`prompt_ids` (a list of ints, a 1-d tensor or a [1, T] tensor) as a list of ints, checked: not
    empty, integers only, and in 0..vocab_size-1. Errors name what was expected and what was given."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
            raise ValueError(f"{what}: expected integer token ids, got a tensor of dtype {prompt_ids.dtype}")
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise ValueError(f"{what}: expected a 1-d or [1, T] tensor of token ids, got shape "
                             f"{list(prompt_ids.shape)}")
        ids = prompt_ids.tolist()
    elif isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Iterable):
        raise ValueError(f"{what}: expected a sequence or tensor of integer token ids, got {prompt_ids!r} "
                         f"({type(prompt_ids).__name__})")
    else:
        ids = list(prompt_ids)
        wrong = next((x for x in ids if isinstance(x, bool) or not isinstance(x, numbers.Integral)), None)
        if wrong is not None:
            raise ValueError(f"{what}: expected integer token ids, got {wrong!r} ({type(wrong).__name__})")
        ids = [int(x) for x in ids]
    if not ids:
        raise ValueError(f"{what}: expected at least one token id, got an empty prompt")
    limit = "" if vocab_size is None else f"..{vocab_size - 1}"
    bad = [x for x in ids if x < 0 or (vocab_size is not None and x >= vocab_size)]
    if bad:
        raise ValueError(f"{what}: expected token ids in 0{limit}, got {bad[:5]}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return ids


def _route(probs: Sequence[float], experts: Sequence[str], router: str) -> Route:
    best = max(range(len(experts)), key=lambda i: probs[i])  # first of equals: the expert listed first
    return Route(experts[best], float(probs[best]), {e: float(p) for e, p in zip(experts, probs)}, router)


class KeywordRouter:
    """Routes to the expert whose keywords occur most often in the prompt.

    `keywords` maps each expert to token ids or token-id sequences (a word is often several tokens).
    Ties go to the expert listed first; with no match the `default` expert gets the prompt with
    confidence 0.0 (there was no evidence), or, without a default, `route` raises ValueError.
    """

    def __init__(self, keywords: dict[str, Iterable[int | Sequence[int]]], default: str | None = None):
        self.keywords: dict[str, list[tuple[int, ...]]] = {}
        for expert, words in keywords.items():
            grams = [tuple(token_list([w] if isinstance(w, numbers.Integral) else w,
                                      what=f"keyword of expert {expert!r}")) for w in words]
            self.keywords[str(expert)] = grams
        names = list(self.keywords) + ([default] if default is not None and default not in self.keywords else [])
        if not names:
            raise ValueError("expected at least one expert with keywords or a default expert, got neither")
        self.default = default
        self._experts = tuple(names)
        self._by_gram: dict[tuple[int, ...], list[int]] = {}  # n-gram -> experts (positions) it counts for
        for position, grams in enumerate(self.keywords.values()):
            for gram in grams:
                self._by_gram.setdefault(gram, []).append(position)
        self._lengths = sorted({len(g) for g in self._by_gram})

    @classmethod
    def from_words(cls, words: dict[str, Iterable[str]], encode: Callable[[str], list[int]],
                   default: str | None = None) -> KeywordRouter:
        """Keywords as text, turned into token-id sequences by a tokenizer's `encode`. Pass an encode that
        adds no BOS token, and the word variants the prompts will contain (" math" and "math" are
        different tokens in most BPE vocabularies)."""
        keywords = {}
        for expert, ws in words.items():
            keywords[expert] = []
            for w in ws:
                ids = list(encode(w))
                if not ids:
                    raise ValueError(f"keyword {w!r} of expert {expert!r}: expected encode to give at least "
                                     "one token id, got none")
                keywords[expert].append(ids)
        return cls(keywords, default)

    @property
    def experts(self) -> tuple[str, ...]:
        return self._experts

    def counts(self, prompt_ids) -> dict[str, int]:
        """Occurrences (overlapping) of each expert's keywords in the prompt."""
        ids = token_list(prompt_ids)
        counts = [0] * len(self._experts)
        for n in self._lengths:
            for start in range(len(ids) - n + 1):
                for position in self._by_gram.get(tuple(ids[start:start + n]), ()):
                    counts[position] += 1
        return dict(zip(self._experts, counts))

    def route(self, prompt_ids) -> Route:
        counts = list(self.counts(prompt_ids).values())
        total = sum(counts)
        if total == 0:
            if self.default is None:
                raise ValueError(f"no keyword of any expert in the prompt and no default expert: expected a "
                                 f"keyword of one of {', '.join(self._experts)}, or a default= expert")
            uniform = 1.0 / len(self._experts)
            return Route(self.default, 0.0, {e: uniform for e in self._experts}, "keyword")
        return _route([c / total for c in counts], self._experts, "keyword")


class EmbeddingBagRouter(nn.Module):
    """Mean of the prompt's token embeddings -> linear -> softmax over the experts.

    A bag of words is enough to tell topics apart, and it is cheap: max_len x dim multiply-adds. Inputs have
    static shapes for torch.export: `tokens` [B, max_len] int64 padded with anything, `length` [B] int64
    the real lengths (1..max_len), so the mask is data (`arange < length`), not a Python slice.
    """

    def __init__(self, vocab_size: int, n_experts: int, dim: int = 64, max_len: int = 64):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_experts", n_experts), ("dim", dim),
                            ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.vocab_size, self.n_experts, self.dim, self.max_len = vocab_size, n_experts, dim, max_len
        self.embedding = nn.Embedding(vocab_size, dim)
        self.classifier = nn.Linear(dim, n_experts)

    def logits(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """[B, n_experts] logits: the masked mean embedding through the linear layer."""
        positions = torch.arange(self.max_len)
        mask = (positions.unsqueeze(0) < length.unsqueeze(1)).to(torch.float32)
        weights = mask / length.unsqueeze(1).to(torch.float32)       # [B, max_len]: 1/length or 0
        embedded = self.embedding(tokens)                             # [B, max_len, dim]
        return self.classifier((embedded * weights.unsqueeze(-1)).sum(dim=1))

    def forward(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(tokens, length), dim=-1)


def pad(ids: Sequence[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([1, max_len] tokens, [1] length) for a checked, non-empty prompt. A prompt longer than max_len keeps
    its LAST max_len tokens: the most recent tokens say most about what is asked now (a long prompt is
    usually context or history followed by the request). Padding is 0; the mask ignores it."""
    ids = list(ids)[-max_len:]
    tokens = torch.zeros(1, max_len, dtype=torch.int64)
    tokens[0, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return tokens, torch.tensor([len(ids)], dtype=torch.int64)


class CompiledRouter:
    """An EmbeddingBagRouter compiled once by fusec (batch 1), with expert names, save and load."""

    def __init__(self, module: EmbeddingBagRouter, experts: Sequence[str], backend: str = "numba"):
        experts = tuple(experts)
        if len(experts) != module.n_experts or len(set(experts)) != len(experts):
            raise ValueError(f"expected {module.n_experts} distinct expert names (the module's n_experts), "
                             f"got {list(experts)}")
        self.module, self._experts, self.backend = module.eval(), experts, backend
        self.training_accuracy: float | None = None
        self.training_seconds: float | None = None
        example = pad([0], module.max_len)
        self.compiled = fusec.compile(module, example, backend=backend)

    @property
    def experts(self) -> tuple[str, ...]:
        return self._experts

    def _inputs(self, prompt_ids) -> tuple[torch.Tensor, torch.Tensor]:
        return pad(token_list(prompt_ids, self.module.vocab_size), self.module.max_len)

    def route(self, prompt_ids) -> Route:
        """The compiled router's decision; a prompt longer than max_len is judged by its last max_len tokens
        (see `pad`)."""
        probs = self.compiled(*self._inputs(prompt_ids))
        return _route(probs[0].tolist(), self._experts, f"embedding-bag (fusec {self.backend})")

    def route_many(self, prompts: Iterable) -> list[Route]:
        return [self.route(p) for p in prompts]

    def eager_route(self, prompt_ids) -> Route:
        """The same decision from the uncompiled module in PyTorch (what the compiled one must match)."""
        with torch.no_grad():
            probs = self.module(*self._inputs(prompt_ids))
        return _route(probs[0].tolist(), self._experts, "embedding-bag (eager)")

    def save(self, path: str) -> None:
        m = self.module
        meta = {"format": FORMAT, "experts": json.dumps(list(self._experts)), "vocab_size": json.dumps(m.vocab_size),
                "dim": json.dumps(m.dim), "max_len": json.dumps(m.max_len)}
        save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str, backend: str = "numba") -> CompiledRouter:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: expected a router file (metadata format {FORMAT!r}), got format "
                             f"{meta.get('format')!r}")
        experts = json.loads(meta["experts"])
        module = EmbeddingBagRouter(json.loads(meta["vocab_size"]), len(experts), json.loads(meta["dim"]),
                                    json.loads(meta["max_len"]))
        module.load_state_dict(load_file(str(path)))
        return cls(module, experts, backend)


def train_router(prompts: Sequence[Sequence[int]], labels: Sequence[str], vocab_size: int,
                 experts: Sequence[str] | None = None, dim: int = 64, max_len: int = 64, epochs: int = 150,
                 lr: float = 0.02, seed: int = 0, backend: str = "numba") -> CompiledRouter:
    """Fit an EmbeddingBagRouter to labelled prompts (full-batch Adam, cross-entropy) and compile it.

    `experts` fixes the order of the outputs (default: labels in order of first appearance). The same
    inputs and `seed` give the same weights; the global torch RNG is left as it was.
    """
    if len(prompts) != len(labels):
        raise ValueError(f"expected one label per prompt, got {len(prompts)} prompts and {len(labels)} labels")
    if not prompts:
        raise ValueError("expected at least one labelled prompt, got none")
    experts = list(dict.fromkeys(labels)) if experts is None else list(experts)
    if len(set(experts)) != len(experts):
        raise ValueError(f"expected distinct expert names, got {experts}")
    index = {e: i for i, e in enumerate(experts)}
    for i, label in enumerate(labels):
        if label not in index:
            raise ValueError(f"label of prompt {i}: expected one of the experts {experts}, got {label!r}")
    for name, value in (("vocab_size", vocab_size), ("dim", dim), ("max_len", max_len), ("epochs", epochs)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    padded = [pad(token_list(p, vocab_size, f"prompt {i}"), max_len) for i, p in enumerate(prompts)]
    tokens = torch.cat([t for t, _ in padded])
    lengths = torch.cat([n for _, n in padded])
    targets = torch.tensor([index[label] for label in labels])

    start, threads = time.perf_counter(), torch.get_num_threads()
    # One intra-op thread: the same float sums in the same order on any machine (the result depends on
    # the seed only), and these tensors are small enough that threads cost more in synchronization than
    # they save, many times more on a shared CPU.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = EmbeddingBagRouter(vocab_size, len(experts), dim, max_len)
            optimizer = torch.optim.Adam(module.parameters(), lr=lr)
            for _ in range(epochs):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(module.logits(tokens, lengths), targets)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (module.logits(tokens, lengths).argmax(dim=-1) == targets).float().mean().item()
    router = CompiledRouter(module, experts, backend)
    router.training_accuracy, router.training_seconds = accuracy, seconds
    return router


TOPIC_TOKENS = 40       # per expert
TOPIC_SEED = 20240601   # topics depend only on the expert's position and vocab_size, never on `seed`


def synthetic_prompts(experts: Sequence[str], n_per_expert: int, vocab_size: int,
                      length_range: tuple[int, int] = (8, 48), seed: int = 0) -> tuple[list[list[int]], list[str]]:
    """`n_per_expert` labelled prompts per expert: each token is one of the expert's own 40 topic tokens
    with probability 1/2, else a common token (one that is no expert's topic). The topic sets are fixed by
    the expert's position and `vocab_size` alone, so prompts from another `seed` are a held-out set of the
    same task. Lengths are uniform in `length_range` (inclusive). Prompts are interleaved by expert."""
    low, high = length_range
    if not 1 <= low <= high:
        raise ValueError(f"length_range: expected (low, high) with 1 <= low <= high, got {length_range}")
    needed = TOPIC_TOKENS * len(experts) + 1
    if vocab_size < needed:
        raise ValueError(f"vocab_size: expected at least {needed} for {len(experts)} experts "
                         f"({TOPIC_TOKENS} topic tokens each and a common one), got {vocab_size}")
    vocab = list(range(vocab_size))
    random.Random(TOPIC_SEED).shuffle(vocab)
    topics = [vocab[i * TOPIC_TOKENS:(i + 1) * TOPIC_TOKENS] for i in range(len(experts))]
    common = vocab[len(experts) * TOPIC_TOKENS:]
    rng = random.Random(seed)
    prompts, labels = [], []
    for _ in range(n_per_expert):
        for topic, expert in zip(topics, experts):
            length = rng.randint(low, high)
            prompts.append([rng.choice(topic) if rng.random() < 0.5 else rng.choice(common) for _ in range(length)])
            labels.append(expert)
    return prompts, labels
