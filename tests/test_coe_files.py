"""CoE expert files (safetensors, the config in the metadata): a damaged header entry or config leaves the
expert out with a warning, a config implying more than the file holds is refused at once, and a file
rewritten after registration is read by its new header or refused, never read at the old offsets."""
from __future__ import annotations

import json
import struct
import time

import pytest
import torch

from fusec.coe import CoE, ExpertError, save_expert
from fusec.coe.experts import FileExpert
from fusec.models.causal_lm import CONFIG_KEY, random_model
from fusec.models.llama import LlamaConfig

from coe_common import CONFIG

LAYER0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("expert_files")
    return save_expert(random_model(CONFIG, seed=0), folder / "good.safetensors")


def split(path) -> tuple[dict, bytes]:
    """(the header as a dict, the data section) of a safetensors file."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def write(path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def with_config(header: dict, **changes) -> dict:
    meta = dict(header["__metadata__"])
    meta[CONFIG_KEY] = json.dumps({**json.loads(meta[CONFIG_KEY]), **changes})
    return {**header, "__metadata__": meta}


def with_entry(header: dict, key: str, value) -> dict:
    return {**header, LAYER0: value} if key is None else {**header, LAYER0: {**header[LAYER0], key: value}}


def without_offsets(header: dict) -> dict:
    return {**header, LAYER0: {k: v for k, v in header[LAYER0].items() if k != "data_offsets"}}


DAMAGE = {
    "no_data_offsets": without_offsets,
    "offsets_a_string": lambda h: with_entry(h, "data_offsets", "0..10"),
    "offsets_a_number": lambda h: with_entry(h, "data_offsets", 7),
    "offsets_one_number": lambda h: with_entry(h, "data_offsets", [0]),
    "offsets_of_strings": lambda h: with_entry(h, "data_offsets", ["0", "8192"]),
    "offsets_backwards": lambda h: with_entry(h, "data_offsets", [8192, 0]),
    "entry_a_list": lambda h: with_entry(h, None, [1, 2]),
    "dtype_a_list": lambda h: with_entry(h, "dtype", ["BF16"]),
    "shape_a_number": lambda h: with_entry(h, "shape", 64),
    "metadata_a_number": lambda h: {**h, "__metadata__": 3},
    "config_a_list": lambda h: {**h, "__metadata__": {CONFIG_KEY: "[1, 2]"}},
    "zero_heads": lambda h: with_config(h, num_attention_heads=0),
    "float_width": lambda h: with_config(h, hidden_size=64.0),
    "negative_layers": lambda h: with_config(h, num_hidden_layers=-2),
    "width_past_int64": lambda h: with_config(h, intermediate_size=2 ** 70),
    "rope_theta_a_list": lambda h: with_config(h, rope_theta=[1, 2]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_header_leaves_the_expert_out_with_a_warning(good, tmp_path, damage):
    header, data = split(good)
    bad = write(tmp_path / "bad.safetensors", DAMAGE[damage](header), data)
    with pytest.raises(ExpertError, match="expert 'bad': "):
        FileExpert("bad", bad)
    with pytest.warns(UserWarning, match="expert 'bad': .*serving without it"):
        coe = CoE(None, {"good": good, "bad": bad}, hbm_bytes=1 << 30)
    assert set(coe.unavailable) == {"bad"} and coe.experts == ["good"]
    coe.close()


@pytest.mark.parametrize("changes, words", [
    ({"num_hidden_layers": 10 ** 6}, "num_hidden_layers=1000000 implies 9000003 tensors, the header lists 21"),
    ({"hidden_size": 1 << 40, "num_attention_heads": 1 << 30}, "does not hold a model of"),
    ({"vocab_size": 1 << 62}, "does not hold a model of")])
def test_a_config_implying_more_than_the_file_holds_is_refused_at_once(good, tmp_path, changes, words):
    header, data = split(good)
    bad = write(tmp_path / "big.safetensors", with_config(header, **changes), data)
    start = time.perf_counter()
    with pytest.raises(ExpertError, match="expert 'big': ") as info:
        FileExpert("big", bad)
    assert time.perf_counter() - start < 2.0
    assert words in str(info.value)


def test_an_entry_past_the_end_of_the_file_is_refused(good, tmp_path):
    header, data = split(good)
    entry = header[LAYER0]
    start, stop = entry["data_offsets"]
    far = len(data) + 64
    moved = with_entry(header, "data_offsets", [far, far + stop - start])
    with pytest.raises(ExpertError, match="expert 'past': .*truncated"):
        FileExpert("past", write(tmp_path / "past.safetensors", moved, data))


def test_a_file_rewritten_with_another_header_is_read_by_its_new_header(good, tmp_path):
    header, data = split(good)
    path = write(tmp_path / "moving.safetensors", header, data)
    expert = FileExpert("moving", path)
    want = expert.load()
    longer = {**header, "__metadata__": {**header["__metadata__"], "note": "x" * 1000}}
    write(path, longer, data)  # the same tensors, 1 KB further into the file
    got = expert.load()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert expert.data_start == FileExpert("again", path).data_start


def test_a_file_rewritten_with_other_tensors_is_refused_naming_the_expert(good, tmp_path):
    header, data = split(good)
    path = write(tmp_path / "moving.safetensors", header, data)
    expert = FileExpert("moving", path)
    other = random_model(LlamaConfig(**{**vars(CONFIG), "hidden_dim": 96}), seed=1)
    save_expert(other, path)
    with pytest.raises(ExpertError, match="expert 'moving': .*rewritten after it was registered"):
        expert.load()
    save_expert(random_model(CONFIG, seed=2), path, dtype=torch.float32)  # same model, other dtypes
    with pytest.raises(ExpertError, match="expert 'moving': .*rewritten after it was registered"):
        expert.load()
    write(path, header, data)  # the registered file back: served again
    assert torch.equal(expert.load()[LAYER0], FileExpert("x", path).load()[LAYER0])
