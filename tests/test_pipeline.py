"""The pipeline runner: stages in order, verify after every pass, errors that name the pass, one debug knob."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import fusec

from fusec import debug
from fusec.api import lower
from fusec.errors import FusecError, IRError
from fusec.ir import Graph, TensorType
from fusec.models.causal_lm import CausalLM
from fusec.models.llama import LlamaConfig
from fusec.printer import format_graph, parse_graph
from fusec.passes import pipeline
from fusec.passes.canonicalize import canonicalize, eliminate_common_subexpressions, eliminate_dead_code
from fusec.passes.pipeline import register_stage, run_pipeline

SOURCE = """
    %0 = input {index=0, name="x"} : f32[2,3]
    %1 = const {value=1.0} : f32[]
    %2 = mul %0, %1 : f32[2,3]
    %3 = reshape %2 {shape=[2,3]} : f32[2,3]
    %4 = exp %3 : f32[2,3]
    %5 = exp %0 : f32[2,3]
    %6 = add %4, %5 : f32[2,3]
    return %6
"""
CANONICAL = """
%0 = input {index=0, name="x"} : f32[2,3]
%1 = exp %0 : f32[2,3]
%2 = add %1, %1 : f32[2,3]
return %2
""".strip()


def break_types(graph: Graph) -> Graph:
    """A broken pass: claims the last node makes f64."""
    last = graph.nodes[-1]
    return replace(graph, nodes=graph.nodes[:-1] + (replace(last, type=TensorType(last.shape, "f64")),))


def crash(graph: Graph) -> Graph:
    raise ZeroDivisionError("a bug in a pass")


@pytest.fixture
def stages(monkeypatch):
    """A private registry, so tests can add stages without touching the real one."""
    monkeypatch.setattr(pipeline, "STAGES", {"canonical": pipeline.STAGES["canonical"]})
    return pipeline.STAGES


def test_canonical_stage_gives_the_canonical_form():
    assert format_graph(run_pipeline(parse_graph(SOURCE), until="canonical")) == CANONICAL
    assert format_graph(canonicalize(parse_graph(SOURCE))) == CANONICAL


def test_callback_sees_every_pass_in_order(stages):
    register_stage("later", (("cse_again", eliminate_common_subexpressions),))
    seen: list[str] = []
    out = run_pipeline(parse_graph(SOURCE), callback=lambda name, g: seen.append(name))
    assert seen == [name for name, _ in pipeline.STAGES["canonical"]] + ["cse_again"]
    assert format_graph(out) == CANONICAL


def test_until_stops_after_that_stage(stages):
    register_stage("broken", (("break_types", break_types),))
    run_pipeline(parse_graph(SOURCE), until="canonical")  # the broken stage does not run
    with pytest.raises(FusecError, match="unknown stage 'fusedd'.*canonical, broken"):
        run_pipeline(parse_graph(SOURCE), until="fusedd")


def test_register_stage_orders_and_replaces(stages):
    register_stage("placed", ())
    register_stage("fused", (), after="canonical")
    register_stage("tiled", (), after="fused")
    assert list(stages) == ["canonical", "fused", "tiled", "placed"]
    register_stage("fused", (("dce", eliminate_dead_code),))  # replaced in place
    assert list(stages) == ["canonical", "fused", "tiled", "placed"] and len(stages["fused"]) == 1
    with pytest.raises(FusecError, match="after 'nope'"):
        register_stage("x", (), after="nope")


def test_a_pass_that_breaks_the_ir_is_named_with_the_passes_before_it(stages):
    stages.clear()
    register_stage("canonical", (("dce", eliminate_dead_code), ("cse", eliminate_common_subexpressions)))
    register_stage("fused", (("break_types", break_types), ("cse", eliminate_common_subexpressions)))
    with pytest.raises(IRError) as info:
        run_pipeline(parse_graph(SOURCE))
    msg = str(info.value)
    assert "pass 'break_types' (stage 'fused') broke the IR" in msg
    assert "type is f64[2,3] but its operands give f32[2,3]" in msg
    assert "passes run before it: dce, cse" in msg


def test_the_first_pass_failing_says_so(stages):
    stages.clear()
    register_stage("only", (("break_types", break_types),))
    with pytest.raises(IRError, match="'break_types'.*\n.*it was the first pass"):
        run_pipeline(parse_graph(SOURCE))


def test_a_broken_input_graph_is_reported_before_any_pass():
    graph = break_types(parse_graph(SOURCE))
    with pytest.raises(IRError, match="input graph is broken before any pass ran"):
        run_pipeline(graph)


def test_a_crashing_pass_gets_a_note_naming_it(stages):
    register_stage("crashy", (("crash", crash),))
    with pytest.raises(ZeroDivisionError) as info:
        run_pipeline(parse_graph(SOURCE))
    assert any("in pass 'crash' (stage 'crashy'), after: dce, cse" in note for note in info.value.__notes__)


def test_debug_level_1_prints_pass_names_and_times(monkeypatch, capsys):
    monkeypatch.setenv("FUSEC_DEBUG", "1")
    run_pipeline(parse_graph(SOURCE))
    err = capsys.readouterr().err
    for name, _ in pipeline.STAGES["canonical"]:
        assert f"canonical/{name}" in err
    assert " ms " in err and "nodes" in err
    assert "return" not in err  # no IR at level 1


def test_debug_level_2_prints_the_ir_after_each_pass(monkeypatch, capsys):
    monkeypatch.setenv("FUSEC_DEBUG", "2")
    run_pipeline(parse_graph(SOURCE), until="canonical")
    err = capsys.readouterr().err
    assert "--- after canonical/dce" in err
    assert err.rstrip().endswith(CANONICAL)


def test_debug_is_quiet_by_default_and_rejects_garbage(monkeypatch, capsys):
    monkeypatch.delenv("FUSEC_DEBUG", raising=False)
    run_pipeline(parse_graph(SOURCE))
    assert capsys.readouterr().err == ""
    assert debug.DEBUG == 0
    monkeypatch.setenv("FUSEC_DEBUG", "verbose")
    with pytest.raises(FusecError, match="FUSEC_DEBUG must be an integer"):
        debug.debug_level()


def test_the_cpu_target_never_places(monkeypatch, capsys):
    """The RDU placement is an analysis for another target: a CPU compile does not run it."""
    monkeypatch.setenv("FUSEC_DEBUG", "1")
    graph = lower(parse_graph(SOURCE))
    err = capsys.readouterr().err
    assert "placement" not in graph.annotations and "placed/" not in err and "tiled/tile" in err
    placed = lower(parse_graph(SOURCE), target="rdu")
    assert "placement" in placed.annotations and "placed/place" in capsys.readouterr().err


def test_a_generator_compile_never_places(monkeypatch, capsys, tmp_path):
    """A KV-cache generator's programs (prefill and decode step) go through the cpu pipeline too: the
    passes FUSEC_DEBUG=1 lists end with tiling, with no placement. (An empty cache directory: a cached
    lowering would run no pass at all.)"""
    monkeypatch.setenv("FUSEC_DEBUG", "1")
    monkeypatch.setenv("FUSEC_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    generator = fusec.compile_generator(CausalLM(LlamaConfig.tiny()).eval(), backend="reference")
    generator.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    err = capsys.readouterr().err
    assert err.count("tiled/tile") >= 2 and "placed/" not in err and "/place " not in err


def test_unfused_and_weight_formats_are_stages_of_one_description(capsys, monkeypatch):
    monkeypatch.setenv("FUSEC_DEBUG", "1")
    lower(parse_graph(SOURCE), fuse=False, weights="bf16")
    err = capsys.readouterr().err
    assert "unfused/unfuse" in err and "weights/store_weights" in err and "fused/fuse " not in err
    with pytest.raises(FusecError, match="unknown target 'gpu'"):
        lower(parse_graph(SOURCE), target="gpu")


def test_bf16_weights_with_a_torch_fallback_compile_and_match_eager():
    """Once the CPU compile placed its program, and a program with fallbacks has no RDU placement."""
    import torch

    import fusec

    class FloorAfterLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 128)

        def forward(self, x):
            return torch.div(self.linear(x), 0.5, rounding_mode="floor")

    module, x = FloorAfterLinear().eval(), torch.randn(4, 64)
    compiled = fusec.compile(module, (x,), weights="bf16")
    assert compiled.stats["torch_ops"] == 1
    with torch.no_grad():
        want = torch.div(torch.nn.functional.linear(x, module.linear.weight.bfloat16().float(),
                                                    module.linear.bias), 0.5, rounding_mode="floor")
    assert (compiled(x) - want).abs().max().item() <= 1.0  # floor may step at a rounding boundary
