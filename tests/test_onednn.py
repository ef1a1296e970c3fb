"""oneDNN's matmul runs the prefill GEMM blocks (`backends/numba_cpu/onednn.py`): each block equals NumPy's
product, MKL runs what oneDNN refuses or is too small, and torch's thread count is left as it was."""
import numpy as np
import pytest
import torch

from fusec.backends.numba_cpu import mkl, onednn
from fusec.errors import FusecError


def _bits(x):
    """float32 -> bf16 bits, rounded to nearest even (finite inputs)."""
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _widen(bits):
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


@pytest.fixture
def on(monkeypatch):
    monkeypatch.delenv("FUSEC_BLAS", raising=False)
    assert onednn.use(True) == "", "oneDNN is a dependency on this platform: it must load"
    yield
    onednn.use(True)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
def test_a_block_equals_numpys_product(on, transposed, accumulate):
    rng = np.random.default_rng(1)
    m, k, n = 96, 320, 200
    a = rng.standard_normal((m, k), np.float32)
    w = rng.standard_normal((n, k), np.float32)
    b = w if transposed else np.ascontiguousarray(w.T)
    out = rng.standard_normal((m, n + 56), np.float32)  # the block: columns 24..223 of a wider output
    before = out.copy()
    assert onednn.block(a, b, out[:, 24:24 + n], transposed, accumulate, onednn.F32)
    want = a.astype(np.float64) @ w.T.astype(np.float64) + (before[:, 24:24 + n] if accumulate else 0)
    np.testing.assert_allclose(out[:, 24:24 + n], want, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(out[:, :24], before[:, :24])
    np.testing.assert_array_equal(out[:, 24 + n:], before[:, 24 + n:])


def test_a_bf16_block_sums_the_exact_products_in_float32(on):
    rng = np.random.default_rng(2)
    a, w = _bits(rng.standard_normal((64, 512), np.float32)), _bits(rng.standard_normal((300, 512), np.float32))
    c = np.empty((64, 300), np.float32)
    assert onednn.block(a, w, c, True, False, onednn.BF16)
    want = _widen(a).astype(np.float64) @ _widen(w).T.astype(np.float64)
    np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-3)


def test_small_blocks_and_the_switch_leave_the_block_to_mkl(on):
    x = np.ones((4, 8), np.float32)
    assert not onednn.block(x, x, np.empty((4, 4), np.float32), True, False, onednn.F32)  # below MIN_MACS
    big = np.ones((128, 256), np.float32)
    onednn.use(False)
    assert not onednn.block(big, big, np.empty((128, 128), np.float32), True, False, onednn.F32)


def test_a_block_onednn_refuses_runs_on_mkl_and_is_reported_once(on, monkeypatch, capsys):
    def refuse(*args):
        raise RuntimeError("oneDNN matmul descriptor: status 3")
    monkeypatch.setattr(onednn._STATE["onednn"], "run", refuse)
    monkeypatch.setitem(onednn._STATE, "failed", "")
    rng = np.random.default_rng(3)
    a, w = rng.standard_normal((128, 256), np.float32), rng.standard_normal((512, 256), np.float32)
    c = np.empty((128, 512), np.float32)
    for _ in range(2):
        mkl.gemm_mkl(a, w, c, True)
        np.testing.assert_allclose(c, a @ w.T, rtol=1e-4, atol=1e-3)
    err = capsys.readouterr().err
    assert err.count("oneDNN failed a GEMM block (oneDNN matmul descriptor: status 3); MKL runs such blocks") == 1


def test_the_gemms_leave_torchs_thread_count_as_it_was(on):
    threads = torch.get_num_threads()
    rng = np.random.default_rng(4)
    a, w = rng.standard_normal((256, 512), np.float32), rng.standard_normal((1024, 512), np.float32)
    mkl.gemm_mkl(a, w, np.empty((256, 1024), np.float32), True)
    assert torch.get_num_threads() == threads


def test_fusec_blas_chooses_the_library_of_the_blocks(monkeypatch):
    monkeypatch.setenv("FUSEC_BLAS", "mkl")
    assert mkl.blas_choice() == ("mkl", "") and mkl.gemm_blocks() == ("mkl", "not chosen")
    monkeypatch.setenv("FUSEC_BLAS", "onednn")
    assert mkl.blas_choice() == ("mkl", "") and mkl.gemm_blocks() == ("onednn", "")
    monkeypatch.setattr(onednn, "_STATE", {"onednn": None, "reason": "", "failed": ""})
    monkeypatch.setattr(onednn, "_library_path", lambda: "/nonexistent/libdnnl.so.3")
    with pytest.raises(FusecError, match="FUSEC_BLAS=onednn, but oneDNN cannot be used: no libdnnl.so.3"):
        mkl.blas_choice()
    monkeypatch.delenv("FUSEC_BLAS")
    assert mkl.blas_choice() == ("mkl", "")  # MKL runs the blocks, said by gemm_blocks
    assert mkl.gemm_blocks() == ("mkl", "no libdnnl.so.3 in this environment (the onednn-cpu-gomp package)")
    monkeypatch.undo()
    onednn.use(True)


def test_a_thread_keeps_its_most_recent_primitives_and_each_block_stays_right(on, monkeypatch):
    """Past `_MAX_PRIMITIVES` shapes on a thread the least recently used primitive is destroyed (a server's
    many prompt lengths do not grow memory without bound); a shape seen again is made again."""
    monkeypatch.setattr(onednn, "_MAX_PRIMITIVES", 2)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((160, 512), np.float32)
    for m in (64, 72, 80, 64, 88):
        a = rng.standard_normal((m, 512), np.float32)
        c = np.empty((m, 160), np.float32)
        assert onednn.block(a, w, c, True, False, onednn.F32)
        np.testing.assert_allclose(c, a @ w.T, rtol=1e-4, atol=1e-3)
    kept = onednn._STATE["onednn"].local.primitives
    assert [key[0] for key in kept] == [64, 88]


def test_one_compiled_program_runs_its_blocks_on_either_library(on, monkeypatch):
    """The library is chosen at run time, not compiled in: the same program (a stories15M block's prefill,
    blocks above MIN_MACS) gives eager's output with its blocks on oneDNN and on MKL. Which one ran is
    counted at oneDNN's entry (on an Intel CPU the two can give the same bits)."""
    import fusec
    from fusec.models import LlamaBlock, LlamaConfig, example_inputs
    torch.manual_seed(0)
    block = LlamaBlock(LlamaConfig.preset("stories15M")).eval()
    (x,) = example_inputs(block.config, seq_len=128)
    with torch.no_grad():
        want = block(x)
    compiled = fusec.compile(block, (x,))
    assert compiled.stats["blas"] == "onednn"
    library_run = onednn._STATE["onednn"].run
    calls = []
    monkeypatch.setattr(onednn._STATE["onednn"], "run", lambda *a: calls.append(1) or library_run(*a))
    outputs, counts = [], []
    for library in (True, False, True):
        onednn.use(library)
        before = len(calls)
        outputs.append(compiled(x))
        counts.append(len(calls) - before)
    for got in outputs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert counts[0] > 0 and counts[1] == 0 and counts[2] == counts[0]  # oneDNN, then MKL, then oneDNN
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)
