"""`fusec generate MODEL_PATH --prompt TEXT` end to end on each checkpoint format, written here from one
tiny transformers Llama (tests/model_files.py): the tokens are transformers' greedy ones, the text streams
to stdout, progress and the speed line go to stderr, and a seed reproduces a sampled continuation."""
from __future__ import annotations

import json

import pytest
import torch

from fusec.cli import main
from fusec.models.causal_lm import from_hf
from model_files import TEXT, pieces_and_scores, save_hf_directory, train_tokenizer, write_gguf, write_llama2c
from test_loaders import llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaPerformanceWarning")

PROMPT = "Once upon a time"
NEW = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fusec.loaders.llama2c import write_tokenizer
    path = tmp_path_factory.mktemp("generate")
    tok = train_tokenizer()
    hf = llama(tok)
    model = from_hf(hf)
    save_hf_directory(hf, tok, path / "hf")
    pieces, scores, _ = pieces_and_scores(tok)
    write_tokenizer(path / "tokenizer.bin", [p.replace("▁", " ") for p in pieces], scores)
    ids = torch.tensor([tok.encode(PROMPT).ids])
    with torch.no_grad():
        greedy = hf.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1]:].tolist()
    return {"hf": path / "hf", "llama2c": write_llama2c(model, path / "model.bin", 0),
            "gguf": write_gguf(model, path / "model.gguf", "llama", tok), "greedy": greedy}


def run(capsys, *argv) -> tuple[str, str]:
    assert main(["generate", *map(str, argv)]) == 0
    out = capsys.readouterr()
    return out.out, out.err


@pytest.mark.parametrize("kind", ["hf", "llama2c", "gguf"])
def test_generate_gives_the_greedy_tokens_of_transformers_for_each_format(files, capsys, kind):
    out, err = run(capsys, files[kind], "--prompt", PROMPT, "--max-new-tokens", NEW, "--temperature", 0,
                   "--json", "--no-roofline")
    result = json.loads(out)
    assert result["format"] == kind and result["new_ids"] == files["greedy"]
    assert result["prompt_ids"][0] == 1 and result["tokens_generated"] == NEW
    assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0
    assert "compiling the decode program" in err and "compiling the prefill program" in err


def test_text_streams_and_a_seed_reproduces_it(files, capsys):
    args = [files["llama2c"], "--prompt", TEXT[0], "--max-new-tokens", NEW, "--temperature", 1.0,
            "--top-k", 50, "--top-p", 0.9, "--seed", 5]
    out, err = run(capsys, *args)
    sampled = json.loads(run(capsys, *args, "--json", "--no-roofline")[0])
    assert out == TEXT[0] + sampled["text"] + "\n" and sampled["seed"] == 5
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"prompt {len(sampled['prompt_ids'])} tokens at") and f"generated {NEW} tokens" in last
    assert "of the bandwidth roofline" in last and last.endswith("seed 5")


def test_errors_name_the_file_and_the_problem(files, capsys, tmp_path):
    lonely = tmp_path / "model.bin"
    lonely.write_bytes(files["llama2c"].read_bytes())
    assert main(["generate", str(lonely), "--prompt", "hi"]) == 1
    assert f"{lonely}: no tokenizer.bin beside" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "absent.gguf"), "--prompt", "hi"]) == 1
    assert "no model at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", str(lonely), "--prompt", "hi", "--top-p", "0"])
    assert "expected a probability" in capsys.readouterr().err
