"""What the CoE tests share: a small Llama config, a router that routes by a prompt's first token, and
an expert's answer when it runs alone (its file loaded as a model and compiled on its own)."""
from __future__ import annotations

from types import SimpleNamespace

from fusec.generate import compile_generator
from fusec.models.causal_lm import load_safetensors
from fusec.models.llama import LlamaConfig

CONFIG = LlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64, vocab_size=256, n_layers=2)
PROMPT = [3, 17, 42, 7, 99]
OPTIONS = dict(max_seq_len=64, prompt_buckets=(16, 32))


class ByFirstToken:
    """Routes a prompt starting with token i to names[i % len(names)]; `experts` (default: names) is what
    it says it can choose."""

    def __init__(self, names, experts=None):
        self.names, self.experts = tuple(names), tuple(experts or names)

    def route(self, ids):
        return SimpleNamespace(expert=self.names[int(ids[0]) % len(self.names)], confidence=1.0)


def prompt_for(name: str, names) -> list[int]:
    """A prompt `ByFirstToken(names)` sends to `name`."""
    return [list(names).index(name)] + PROMPT


def run_alone(path, prompt, tokens: int):
    """The expert in `path` by itself: loaded as a model, compiled on its own, greedy."""
    generator = compile_generator(load_safetensors(path), 64, weights="bf16", prompt_buckets=(16, 32))
    return generator.generate(prompt, max_new_tokens=tokens)


def ask_concurrently(coe, names, prompt_for, tokens: int) -> list:
    """One thread per request, all at once: the results in request order (a thread's error is raised)."""
    import threading
    got, errors = {}, []

    def ask(i, name):
        try:
            got[i] = coe.generate(prompt_for(name), max_new_tokens=tokens)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [got[i] for i in range(len(names))]
