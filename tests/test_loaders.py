"""Checkpoint loaders and tokenizers (fusec/loaders): the files are written here from one set of weights
(tests/model_files.py) and each format must give the tokens transformers gives on those weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fusec.generate import eager_generate
from fusec.loaders import detect_format, load
from fusec.models.causal_lm import from_hf
from model_files import (TEXT, pieces_and_scores, save_hf_directory, train_tokenizer, write_gguf, write_llama2c)
from test_architectures import CONFIGS, hf_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

PROMPTS = [TEXT[0], "The little robot", "héllo wörld ✓ 42", "new\nline"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def llama(tokenizer, tied: bool = False, seed: int = 0):
    """A tiny transformers Llama whose vocabulary is the tokenizer's."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128,
                                      vocab_size=tokenizer.get_vocab_size(), bos_token_id=1, eos_token_id=None,
                                      pad_token_id=0, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def mapped_file(t: torch.Tensor) -> str:
    """The file whose memory map holds the tensor's data ("" for ordinary memory), from /proc/self/maps."""
    address = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else ""
    return ""


def greedy_equal(model, hf, ids: list[int], steps: int = 20) -> bool:
    prompt = torch.tensor([ids])
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=steps, do_sample=False)
    return torch.equal(eager_generate(model, prompt, steps)[0], want)


def test_tokenizers_of_every_format_agree(tokenizer, tmp_path):
    hf = llama(tokenizer)
    model = from_hf(hf)
    save_hf_directory(hf, tokenizer, tmp_path / "hf")
    pieces, scores, _ = pieces_and_scores(tokenizer)
    from fusec.loaders.llama2c import write_tokenizer
    write_tokenizer(tmp_path / "tokenizer.bin", [p.replace("▁", " ") for p in pieces], scores)
    write_llama2c(model, tmp_path / "model.bin")
    write_gguf(model, tmp_path / "model.gguf", "llama", tokenizer)
    toks = {kind: load(path).tokenizer for kind, path in
            (("hf", tmp_path / "hf"), ("llama2c", tmp_path / "model.bin"), ("gguf", tmp_path / "model.gguf"))}
    for text in PROMPTS:
        want = tokenizer.encode(text).ids
        assert want[0] == 1 and len(want) > 2
        for kind, tok in toks.items():
            assert tok.encode(text) == want, kind
            assert tok.decode(want) == text, kind


@pytest.mark.parametrize("version, tied", [(0, False), (0, True), (1, False), (1, True)])
def test_llama2c_checkpoints_give_the_tokens_of_transformers(tokenizer, tmp_path, version, tied):
    hf = llama(tokenizer, tied=tied)
    path = write_llama2c(from_hf(hf), tmp_path / "model.bin", version)
    loaded = load(path)
    assert loaded.format == "llama2c" and loaded.model.tie_embeddings == tied
    assert mapped_file(loaded.model.layers[1].attention.wv.weight) == str(path)  # a view of the file's map
    assert greedy_equal(loaded.model, hf, tokenizer.encode(TEXT[1]).ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3"])
def test_gguf_files_give_the_tokens_of_transformers(tokenizer, tmp_path, arch):
    hf = llama(tokenizer) if arch == "llama" else hf_model(arch)
    path = write_gguf(from_hf(hf), tmp_path / f"{arch}.gguf", arch, tokenizer if arch == "llama" else None)
    loaded = load(path)
    assert loaded.format == "gguf" and loaded.notes == ()
    assert mapped_file(loaded.model.layers[1].feed_forward.w2.weight) == str(path)
    ids = tokenizer.encode(TEXT[2]).ids if arch == "llama" else list(range(3, 40))
    assert greedy_equal(loaded.model, hf, ids)


def test_q8_0_tensors_quantize_back_to_the_files_blocks_exactly(tokenizer, tmp_path):
    """weights="int8" (passes.weights.quantize_int8, blocks of 32 with a float32 scale) on a dequantized Q8_0
    tensor gives back the file's values: its int8 program reads the weights llama.cpp would."""
    from fusec.passes.weights import quantize_int8
    model = from_hf(llama(tokenizer))
    loaded = load(write_gguf(model, tmp_path / "model.gguf", "llama", tokenizer, "Q8_0"))
    for w in (loaded.model.layers[0].attention.wq.weight, loaded.model.layers[1].feed_forward.w2.weight):
        q, scale = quantize_int8(w)
        assert torch.equal((q.float() * scale).reshape(w.shape), w.detach())


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0"])
def test_gguf_tensor_types_load_as_gguf_dequantizes_them(tokenizer, tmp_path, qtype):
    import gguf
    model = from_hf(llama(tokenizer))
    loaded = load(write_gguf(model, tmp_path / "model.gguf", "llama", tokenizer, qtype))
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    for got, want in ((loaded.model.layers[0].feed_forward.w2.weight, model.layers[0].feed_forward.w2.weight),
                      (loaded.model.output.weight, model.output.weight)):
        rounded = gguf.quants.dequantize(gguf.quants.quantize(want.detach().numpy(), kind), kind)
        assert np.array_equal(got.detach().numpy(), rounded)
    assert loaded.notes == (('Q8_0 tensors dequantized to float32 (weights="int8" keeps Q8_0 blocks as in the '
                             'file)',) if qtype == "Q8_0" else ())
    ids = torch.tensor([tokenizer.encode(TEXT[0]).ids])
    with torch.no_grad():
        error = (loaded.model(ids) - model(ids)).abs().max() / model(ids).abs().max()
    assert error < (2e-2 if qtype != "F16" else 2e-3)


def test_sharded_hf_directory_loads_with_its_tokenizer(tokenizer, tmp_path):
    hf = llama(tokenizer)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load(tmp_path)
    assert loaded.format == "hf" and loaded.tokenizer.encode(TEXT[3]) == tokenizer.encode(TEXT[3]).ids
    assert mapped_file(loaded.model.layers[1].feed_forward.w2.weight).endswith(".safetensors")
    assert greedy_equal(loaded.model, hf, tokenizer.encode(TEXT[3]).ids)


# --- errors name the file and what is wrong ---------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("files")
    hf = llama(tokenizer)
    model = from_hf(hf)
    save_hf_directory(hf, tokenizer, path / "hf")
    return {"hf": path / "hf", "bin": write_llama2c(model, path / "model.bin", 1),
            "gguf": write_gguf(model, path / "model.gguf", "llama", tokenizer), "dir": path}


def truncated(src, dst, keep: float = 0.5):
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("kind, words", [("bin", "truncated llama2.c checkpoint"),
                                         ("gguf", "damaged or truncated GGUF file")])
def test_truncated_files_are_named_with_what_is_wrong(files, tmp_path, kind, words):
    path = truncated(files[kind], tmp_path / files[kind].name)
    with pytest.raises(ValueError, match=words) as error:
        load(path)
    assert str(path) in str(error.value)


def test_damaged_safetensors_and_config_are_named(files, tmp_path):
    import shutil
    directory = shutil.copytree(files["hf"], tmp_path / "hf")
    truncated(files["hf"] / "model.safetensors", directory / "model.safetensors", 0.7)
    with pytest.raises(ValueError, match="damaged or truncated safetensors file") as error:
        load(directory)
    assert "model.safetensors" in str(error.value)
    shutil.copy(files["hf"] / "model.safetensors", directory / "model.safetensors")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: damaged JSON"):
        load(directory)


def test_unknown_architectures_are_named(files, tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    config = json.loads((files["hf"] / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(config, model_type="gpt2", architectures=["GPT2"])))
    (directory / "model.safetensors").write_bytes((files["hf"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
        load(directory)
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
        load(tmp_path / "x.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "scaled.gguf"), "llama")  # Llama 3.1 keeps RoPE scaling as a tensor
    for key, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                       ("context_length", 32), ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("rope_freqs.weight", np.ones(2, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="scaled.gguf: .*rope_scaling"):
        load(tmp_path / "scaled.gguf")


def test_a_missing_tokenizer_is_reported_and_other_files_are_refused(files, tmp_path):
    lonely = tmp_path / "model.bin"
    lonely.write_bytes(files["bin"].read_bytes())
    loaded = load(lonely)
    assert loaded.tokenizer is None and "no tokenizer.bin beside" in loaded.tokenizer_error
    with pytest.raises(ValueError, match="no model at"):
        detect_format(tmp_path / "absent")
    (tmp_path / "v2.bin").write_bytes(b"24ka" + (2).to_bytes(4, "little") + bytes(300))
    with pytest.raises(ValueError, match="version 2"):
        load(tmp_path / "v2.bin")
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
        load(tmp_path / "junk.bin")


def test_a_gguf_byte_level_bpe_tokenizer_encodes_as_its_tokenizer_json(tmp_path):
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tok.to_str())["model"]
    vocab = sorted(data["vocab"], key=data["vocab"].get)
    w = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([3 if t == "<|end|>" else 1 for t in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["merges"]])
    w.add_eos_token_id(0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    from fusec.loaders.gguf import load_tokenizer
    loaded = load_tokenizer(tmp_path / "bpe.gguf")
    for text in PROMPTS:
        assert loaded.encode(text) == tok.encode(text).ids and loaded.decode(loaded.encode(text)) == text
    assert loaded.decode([*tok.encode("the end").ids, 0]) == "the end"  # special tokens left out


def test_the_format_libraries_load_only_when_a_format_needs_them(files):
    import subprocess
    import sys
    code = ("import sys, fusec, fusec.loaders, fusec.generate, fusec.cli; "
            "assert not {'gguf', 'tokenizers', 'safetensors'} & set(sys.modules), sys.modules.keys(); "
            "sys.modules['gguf'] = None; from fusec.loaders import load; load(sys.argv[1])")
    run = subprocess.run([sys.executable, "-c", code, str(files["gguf"])], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "needs the 'gguf' package: pip install 'fusec[models]'" in run.stderr
