"""The real `fusec` console script, run in subprocesses: help, models, dump at each stage and format, and
one-line errors (no traceback) for bad model names and stages; the demo, in this process.

Each command costs an interpreter start plus a trace (~1-3 s), so the commands are started together in a
module-scoped pool and each test waits for the one it checks.
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

VENV_SCRIPT = Path(sys.executable).with_name("fusec")
FUSEC = [str(VENV_SCRIPT)] if VENV_SCRIPT.exists() else [sys.executable, "-m", "fusec"]
COMPARE_OPS = ("eq", "ne", "lt", "le", "gt", "ge")
IR_LINE = re.compile(r"^%(\d+) = (\w+)\b.* : \w+\[[0-9,]*\]$")

USER_MODEL = '''
import torch


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(12, 24)
        self.down = torch.nn.Linear(24, 12)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + x


def make_model():
    torch.manual_seed(0)
    return TwoLayer(), (torch.randn(3, 12),)
'''

COMMANDS = {
    "help": ["--help"],
    "module_help": ["-m", "fusec", "--help"],  # run with the interpreter, not the script
    "models": ["models"],
    "ir": ["dump", "llama-block", "--stage", "ir", "--seq-len", "8"],
    "canonical": ["dump", "llama-block", "--stage", "canonical"],
    "fx": ["dump", "llama-block", "--stage", "fx"],
    "json": ["dump", "llama-block", "--stage", "canonical", "--format", "json"],
    "dot": ["dump", "llama-block", "--stage", "canonical", "--format", "dot"],
    "to_file": ["dump", "llama-block", "--stage", "canonical", "-o", "{tmp}/out.txt"],
    "user_file": ["dump", "{tmp}/user_model.py:make_model", "--stage", "ir"],
    "unknown_model": ["dump", "no-such-model", "--stage", "ir"],
    "unknown_stage": ["dump", "llama-block", "--stage", "no-such-stage"],
}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUSEC_DEBUG"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli")
    (path / "user_model.py").write_text(USER_MODEL)
    return path


@pytest.fixture(scope="module")
def runs(tmp) -> dict[str, Future]:
    """Every command in COMMANDS, started in a pool; `runs[name].result()` is its CompletedProcess."""
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    futures = {}
    for name, args in COMMANDS.items():
        args = [a.replace("{tmp}", str(tmp)) for a in args]
        argv = [sys.executable, *args] if name == "module_help" else [*FUSEC, *args]
        futures[name] = pool.submit(_run, argv, tmp)
    yield futures
    pool.shutdown(wait=True)


def ok(runs, name: str) -> subprocess.CompletedProcess:
    result = runs[name].result()
    assert result.returncode == 0, f"{COMMANDS[name]} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def ir_lines(text: str) -> list[re.Match]:
    return [m for m in (IR_LINE.match(ln) for ln in text.splitlines()) if m]


# --- help and models ------------------------------------------------------------------------------------

def test_help_lists_the_commands(runs):
    out = ok(runs, "help").stdout
    assert "usage: fusec" in out
    for command in ("dump", "demo", "models"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), command


def test_python_dash_m_fusec_works(runs):
    assert ok(runs, "module_help").stdout == ok(runs, "help").stdout


def test_models_lists_the_llama_blocks(runs):
    names = ok(runs, "models").stdout.split()
    assert "llama-block" in names
    for preset in ("tiny", "stories15M", "tinyllama_1b"):
        assert f"llama-block:{preset}" in names


# --- dump -----------------------------------------------------------------------------------------------

def test_dump_ir_prints_one_line_per_node(runs):
    out = ok(runs, "ir").stdout
    lines = out.strip().splitlines()
    header = re.match(r"# llama-block after ir: (\d+) nodes", lines[0])
    assert header, lines[0]
    nodes = ir_lines(out)
    assert len(nodes) == int(header.group(1)) == len(lines) - 2  # header, nodes, return
    assert [int(m.group(1)) for m in nodes] == list(range(len(nodes)))
    assert lines[-1].startswith("return %")
    assert {"input", "param", "matmul"} <= {m.group(2) for m in nodes}
    assert re.search(r"= input \{.*\} : f32\[1,8,64\]$", out, re.MULTILINE), "--seq-len 8 was not used"


def test_dump_canonical_has_no_mask_building_ops(runs):
    out = ok(runs, "canonical").stdout
    ops = {m.group(2) for m in ir_lines(out)}
    assert "matmul" in ops
    assert not ops & {"iota", *COMPARE_OPS}, sorted(ops & {"iota", *COMPARE_OPS})


def test_dump_fx_prints_aten_ops(runs):
    """The graph fusec lowers: torch.export's as captured (linear, not core ATen's mm: the direct lowering,
    `fusec/lowering_direct.py`) when every op has a lowering, as the built-in block's do."""
    out = ok(runs, "fx").stdout
    assert "def forward" in out
    for op in ("aten.linear", "aten.rsqrt", "aten.view"):
        assert f"torch.ops.{op}" in out, op


def test_dump_json_parses_and_matches_the_text(runs):
    data = json.loads(ok(runs, "json").stdout)
    assert set(data) >= {"nodes", "outputs"}
    text_nodes = ir_lines(ok(runs, "canonical").stdout)
    assert [n["op"] for n in data["nodes"]] == [m.group(2) for m in text_nodes]
    assert all(0 <= o < len(data["nodes"]) for o in data["outputs"]) and data["outputs"]


def test_dump_dot_is_a_digraph_with_a_node_per_ir_node(runs):
    out = ok(runs, "dot").stdout
    assert out.startswith("digraph")
    assert out.rstrip().endswith("}")
    node_lines = re.findall(r"^\s*n\d+ \[label=", out, re.MULTILINE)
    assert len(node_lines) == len(ir_lines(ok(runs, "canonical").stdout))


def test_dump_to_file_writes_what_stdout_would_show(runs, tmp):
    result = ok(runs, "to_file")
    assert result.stdout == ""
    written = (tmp / "out.txt").read_text()
    assert written == ok(runs, "canonical").stdout


def test_dump_a_model_from_a_file_spec(runs):
    out = ok(runs, "user_file").stdout
    nodes = ir_lines(out)
    ops = [m.group(2) for m in nodes]
    assert ops.count("param") == 4  # two weights, two biases
    assert ops.count("matmul") == 2
    assert "relu" in ops
    assert re.search(r"= input \{.*\} : f32\[3,12\]$", out, re.MULTILINE)


# --- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("unknown_model", ["no-such-model", "llama-block"]),
    ("unknown_stage", ["no-such-stage", "canonical"]),
])
def test_bad_names_fail_with_one_line_and_no_traceback(runs, name, words):
    result = runs[name].result()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fusec: error:")
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""


# --- demo -----------------------------------------------------------------------------------------------

def test_demo_runs_and_reports_ok(monkeypatch, capsys):
    """`fusec demo`, in this process (the console script is exercised above): the compiled block matches
    PyTorch, the tiny block's benchmark is asked for with flags its parser takes (the benchmark itself
    runs in tests/test_bench_smoke.py), and fusec's generated tokens equal eager's. One timed generation
    instead of the median of three: the timing is printed, not checked."""
    from fusec import bench_block, cli

    asked = []
    monkeypatch.setattr(bench_block, "main", lambda argv: asked.append(bench_block.parse_args(argv)) or 0)
    monkeypatch.setattr(cli, "demo_generate", functools.partial(cli.demo_generate, repeat=1))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^result\s+OK$", out, re.MULTILINE), out
    assert "MISMATCH" not in out
    assert [(a.preset, a.seq, a.past) for a in asked] == [("tiny", 16, 16)]
    assert "tokens     identical to eager" in out, out
