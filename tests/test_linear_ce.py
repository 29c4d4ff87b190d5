"""Chunked projection + cross-entropy (splatopt.kernels.linear_cross_entropy) against the materialized
reference ``decode_cross_entropy(q @ W.T + b, ids, mask)``, its wiring into objective_terms / fit,
and the decode-aware bench. The Triton softmax kernel runs in Triton's CPU interpreter without CUDA.
"""

import importlib.util
import json
import os
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # as in test_kernels: the interpreter must be chosen before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import splatopt  # noqa: E402
from splatopt.kernels.linear_ce import default_chunk_rows, linear_cross_entropy  # noqa: E402
from splatopt.objectives import Objective, decode_cross_entropy, objective_terms  # noqa: E402



def weighted(loss):
    """A scalar whose gradient weighs prompt b by -1.5, -0.5, 0.5, 1.5, -1.5, ... (backward scales per prompt)."""
    return (loss * (torch.arange(len(loss), device=loss.device, dtype=loss.dtype) % 4 - 1.5)).sum()


def make_case(B=3, L=5, d=8, V=37, seed=0, dtype=torch.float32, p_valid=0.7, garbage=True):
    """q [B, L, d] (NaN at padding when ``garbage``), W [V, d], b [V], ids [B, L] (-100 / V + 5 at padding), mask."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, L, d, generator=g) * 2).to(dtype)
    weight = torch.randn(V, d, generator=g).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    ids = torch.randint(V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) < p_valid
    mask[0, 0] = True
    if B > 1:
        mask[-1] = False  # a prompt with no token at all
    if garbage:
        ids = torch.where(mask, ids, torch.where(torch.rand(B, L, generator=g) < 0.5, -100, V + 5))
        q = torch.where(mask[..., None], q, float("nan"))
    return q, weight, bias, ids, mask


def reference(q, weight, bias, ids, mask):
    """(loss [B], grad wrt q [B, L, d]) of the materialized path, q's padding made finite first
    (the reference's gradient is 0 * NaN = NaN at NaN padding; the chunked path gives 0 there)."""
    q = torch.where(mask[..., None], q, 0.0).detach().requires_grad_(True)
    loss = decode_cross_entropy(q @ weight.T + bias, ids, mask)
    (grad,) = torch.autograd.grad(weighted(loss), q)
    return loss.detach(), grad


def chunked(q, weight, bias, ids, mask, **kw):
    q = q.detach().requires_grad_(True)
    loss = linear_cross_entropy(q, weight, bias, ids, mask, **kw)
    (grad,) = torch.autograd.grad(weighted(loss), q)
    return loss.detach(), grad


def assert_matches(got, want, rtol):
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 15, 64, None])
def test_matches_the_materialized_path(dtype, rtol, chunk_rows):
    q, weight, bias, ids, mask = make_case(dtype=dtype)
    got = chunked(q, weight, bias, ids, mask, chunk_rows=chunk_rows)
    assert got[0].dtype == dtype and float(got[0][-1]) == 0.0  # the empty prompt
    assert (got[1][~mask] == 0).all()  # padding rows: no gradient, whatever they held
    assert_matches(got, reference(q, weight, bias, ids, mask), rtol)


def test_without_bias_and_float32_compute_of_float64_queries():
    q, weight, bias, ids, mask = make_case(dtype=torch.float64, seed=1)
    zero = torch.zeros_like(bias)
    assert_matches(chunked(q, weight, None, ids, mask, chunk_rows=4), reference(q, weight, zero, ids, mask), 1e-10)
    # float32 products, float64 accumulation of the result
    got = chunked(q, weight, bias, ids, mask, chunk_rows=4, compute_dtype=torch.float32)
    assert got[0].dtype == torch.float64
    assert_matches(got, reference(q, weight, bias, ids, mask), 1e-5)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), L=st.integers(1, 9), d=st.integers(1, 12), V=st.integers(2, 60),
       chunk=st.integers(1, 40), p_valid=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_property_random_shapes_and_masks(B, L, d, V, chunk, p_valid, seed):
    q, weight, bias, ids, mask = make_case(B, L, d, V, seed, torch.float64, p_valid)
    assert_matches(chunked(q, weight, bias, ids, mask, chunk_rows=chunk), reference(q, weight, bias, ids, mask), 1e-10)


class _Allocations(TorchDispatchMode):
    """Records every tensor an operation returns: the largest one, and the matrix products' shapes."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.products = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.products.append(tuple(out.shape))
        return out


def test_never_allocates_more_than_a_chunk_of_logits():
    B, L, d, V, chunk = 4, 16, 8, 300, 10  # 64 rows: full logits 19200 floats, a chunk 3000
    q, weight, bias, ids, mask = make_case(B, L, d, V, seed=2, p_valid=1.0, garbage=False)
    q.requires_grad_(True)
    with _Allocations() as fused:
        loss = linear_cross_entropy(q, weight, bias, ids, mask, chunk_rows=chunk)
        torch.autograd.grad(loss.sum(), q)
    assert fused.largest <= chunk * V
    with _Allocations() as materialized:  # the detector sees the reference's logits
        decode_cross_entropy(q @ weight.T + bias, ids, mask)
    assert materialized.largest >= B * L * V
    # with grad: two products per chunk (logits, gradient); without: only the logits
    assert len(fused.products) == 2 * 7
    with torch.no_grad(), _Allocations() as forward_only:
        torch.testing.assert_close(linear_cross_entropy(q, weight, bias, ids, mask, chunk_rows=chunk), loss.detach())
    assert forward_only.products == [(chunk, V)] * 6 + [(4, V)]
    assert default_chunk_rows(30522) == 2176 and default_chunk_rows(10) % 64 == 0


def test_refuses_trainable_weights_and_double_backward():
    q, weight, bias, ids, mask = make_case(garbage=False)
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(q, weight.requires_grad_(True), bias, ids, mask)
    with torch.no_grad():  # nothing to differentiate: a trainable weight is harmless
        linear_cross_entropy(q, weight, bias, ids, mask)
    q.requires_grad_(True)
    loss = linear_cross_entropy(q, weight.detach(), bias, ids, mask)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss.sum(), q, create_graph=True)
    with pytest.raises(ValueError, match=r"\[V, d=8\]"):
        linear_cross_entropy(q, weight.detach().T, bias, ids, mask)
    with pytest.raises(TypeError, match="bool"):
        linear_cross_entropy(q, weight.detach(), bias, ids, mask.long())


def test_bf16_products_stay_close():
    q, weight, bias, ids, mask = make_case(L=9, d=32, V=200, seed=3)
    got = chunked(q, weight, bias, ids, mask, chunk_rows=5, compute_dtype=torch.bfloat16)
    want = reference(q, weight, bias, ids, mask)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=5e-2, atol=5e-2)
    assert float((got[1] - want[1]).norm() / want[1].norm()) < 5e-2


def test_triton_softmax_kernel_matches_pytorch():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    from splatopt.kernels.linear_ce import _ce_rows_torch
    from splatopt.kernels.triton_ce import ce_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(6, 50, generator=g) * 8).to(device)
    bias = torch.randn(50, generator=g).to(device)
    ids = torch.randint(50, (6,), generator=g).to(device)
    for block_v in (16, None):  # several tiles per row (and a ragged last one), and one tile
        for grad_dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            loss, grad = ce_rows(logits.clone(), bias, ids, True, grad_dtype, block_v=block_v)
            ref_loss, ref_grad = _ce_rows_torch(logits.clone(), bias, ids, True, grad_dtype)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol)
            assert grad.dtype == grad_dtype
    loss, grad = ce_rows(logits.clone(), None, ids, False, torch.float32)
    assert grad is None
    torch.testing.assert_close(loss, _ce_rows_torch(logits.clone(), None, ids, False, torch.float32)[0])
    bad = ids.clone()
    bad[0], bad[1] = 50, -1  # outside the vocabulary: NaN, never an out-of-bounds read
    loss, _ = ce_rows(logits.clone(), bias, bad, False, torch.float32)
    assert loss[:2].isnan().all() and torch.isfinite(loss[2:]).all()


def test_chunk_loop_through_the_triton_rows(monkeypatch):
    """The CUDA route (kernel rows, fp32 gradient written over the logits in place), on whatever device runs Triton."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    import splatopt.kernels.linear_ce as linear_ce

    monkeypatch.setattr(linear_ce, "_uses_triton", lambda device, acc: acc == torch.float32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, weight, bias, ids, mask = (t.to(device) for t in make_case(seed=10))
    assert_matches(chunked(q, weight, bias, ids, mask, chunk_rows=4), reference(q, weight, bias, ids, mask), 1e-5)


# ------------------------------------------------------------------ the fused one-sweep kernel


def _needs_triton():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bf16(t):
    """t's values rounded to bf16, in float64: the operands the kernel's products see, exactly."""
    return t.to(torch.bfloat16).double()


# the kernel's own tiles at the test's small shapes: several row blocks, several word tiles with a
# ragged last one, and d = 48 as one masked 64-wide chunk (default) or three 16-wide ones
SMALL_TILES = '{"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}'


@pytest.mark.parametrize("tiles", [None, SMALL_TILES])
def test_fused_kernel_matches_the_float64_reference(tiles, monkeypatch):
    device = _needs_triton()
    if tiles:
        monkeypatch.setenv("SPLATOPT_LINEAR_CE_CONFIG", tiles)
    # 70 rows (NaN q and ids outside the vocabulary at padding, one prompt without tokens), V = 300
    q, weight, bias, ids, mask = (t.to(device) for t in make_case(B=5, L=14, d=48, V=300, seed=11))
    got = chunked(q, weight, bias, ids, mask, compute_dtype=torch.bfloat16, impl="fused")
    assert got[0].dtype == torch.float32 and float(got[0][-1]) == 0.0
    assert (got[1][~mask] == 0).all()
    # against float64 products of the same bf16-rounded operands: only float32 sums and the bf16
    # softmax of the gradient product differ
    want = reference(_bf16(q), _bf16(weight), bias.double(), ids, mask)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    assert float((got[1].double() - want[1]).norm() / want[1].norm()) < 1e-2
    # and within bf16 tolerance of the exact float32 problem, as the chunked bf16 path
    exact = reference(q, weight, bias, ids, mask)
    torch.testing.assert_close(got[0], exact[0], rtol=5e-2, atol=5e-2)
    assert float((got[1] - exact[1]).norm() / exact[1].norm()) < 5e-2


def test_fused_kernel_without_bias_without_grad_and_without_tokens(monkeypatch):
    device = _needs_triton()
    monkeypatch.setenv("SPLATOPT_LINEAR_CE_CONFIG", SMALL_TILES)
    q, weight, bias, ids, mask = (t.to(device) for t in make_case(B=3, L=7, d=32, V=50, seed=12))
    got = chunked(q, weight, None, ids, mask, compute_dtype=torch.bfloat16, impl="fused")
    want = reference(_bf16(q), _bf16(weight), torch.zeros(50, dtype=torch.float64, device=device), ids, mask)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
    assert float((got[1].double() - want[1]).norm() / want[1].norm()) < 1e-2
    with torch.no_grad():  # forward only: one product, the same loss
        loss = linear_cross_entropy(q, weight, None, ids, mask, compute_dtype=torch.bfloat16, impl="fused")
    torch.testing.assert_close(loss, got[0])
    none = torch.zeros_like(mask)
    q.requires_grad_(True)
    loss = linear_cross_entropy(q, weight, bias, ids, none, compute_dtype=torch.bfloat16, impl="fused")
    assert (loss == 0).all() and (torch.autograd.grad(loss.sum(), q)[0] == 0).all()


def test_fused_kernel_keeps_a_well_decoded_tokens_tiny_loss(monkeypatch):
    """Targets ahead of every other word by ~20-30 nats: losses ~1e-10 and their gradients to the
    kernel's relative precision — not 0 and not float32 rounding noise of the ~50-sized logits
    (1e-7 or more), as (m - x_t) + log s or lse - x_t would give."""
    device = _needs_triton()
    monkeypatch.setenv("SPLATOPT_LINEAR_CE_CONFIG", SMALL_TILES)
    g = torch.Generator().manual_seed(13)
    B, L, V, d = 2, 6, 300, 48
    weight = torch.nn.functional.normalize(torch.randn(V, d, generator=g), dim=-1)
    ids = torch.randint(V, (B, L), generator=g)
    q = 40.0 * weight[ids] + 2.0 * torch.randn(B, L, d, generator=g)
    bias = torch.randn(V, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    got = chunked(*(t.to(device) for t in (q, weight, bias, ids, mask)), compute_dtype=torch.bfloat16, impl="fused")
    # exact in float64 (log_softmax itself would round 1e-15 losses): the non-target mass relative
    # to the target's, and the gradient sum_{v != t} p_v (W_v - W_t), of the bf16-rounded operands
    w64 = _bf16(weight)
    x = _bf16(q) @ w64.T + bias.double()  # [B, L, V]
    x_t = x.gather(-1, ids[..., None])
    rest = torch.exp(x - x_t).scatter(-1, ids[..., None], 0.0)  # exp(x_v - x_t), v != t
    ce = torch.log1p(rest.sum(-1))  # [B, L]
    p = rest / (1.0 + rest.sum(-1, keepdim=True))
    grad = p @ w64 - p.sum(-1, keepdim=True) * w64[ids]  # d ce / d q
    scale = (torch.arange(B, dtype=torch.float64) % 4 - 1.5) / L  # weighted(): d loss / d ce
    assert 1e-13 < float(ce.min()) and float(ce.max()) < 1e-8
    torch.testing.assert_close(got[0].cpu().double(), ce.mean(-1), rtol=1e-4, atol=0)
    want = grad * scale[:, None, None]
    assert float((got[1].cpu().double() - want).norm() / want.norm()) < 1e-2


def test_fused_kernel_ids_outside_the_vocabulary_give_nan_not_a_crash():
    device = _needs_triton()
    q, weight, bias, ids, mask = (t.to(device) for t in make_case(B=3, L=5, d=16, V=40, seed=14, garbage=False))
    mask[:] = True
    ids[0, 1], ids[1, 2] = 40, -3
    loss = linear_cross_entropy(q, weight, bias, ids, mask, compute_dtype=torch.bfloat16, impl="fused")
    assert loss[:2].isnan().all() and torch.isfinite(loss[2])


def test_impl_choice_and_launch_config(monkeypatch):
    from splatopt.kernels.linear_ce import resolve_impl
    from splatopt.kernels.triton_linear_ce import launch_config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_impl(None, cpu, torch.bfloat16) == "chunked"  # auto: fused only on CUDA
    assert resolve_impl("auto", cpu, torch.float32) == "chunked"
    if importlib.util.find_spec("triton") is not None:
        assert resolve_impl(None, cuda, torch.bfloat16) == "fused"
    assert resolve_impl(None, cuda, torch.float32) == "chunked"
    with pytest.raises(ValueError, match="bf16/fp16"):
        resolve_impl("fused", cuda, torch.float32)
    with pytest.raises(ValueError, match="choose among"):
        resolve_impl("fast", cpu, None)
    monkeypatch.setenv("SPLATOPT_LINEAR_CE_IMPL", "chunked")
    assert resolve_impl(None, cuda, torch.bfloat16) == "chunked"
    pytest.importorskip("triton")
    cfg = launch_config(384, 30522)
    assert (cfg["BLOCK_K"], cfg["NUM_K"], cfg["BLOCK_V"]) == (128, 3, 128)
    assert launch_config(48, 300)["NUM_K"] == 1 and launch_config(1024, 300)["NUM_K"] == 4
    monkeypatch.setenv("SPLATOPT_LINEAR_CE_CONFIG", '{"BLOCK_M": 64, "num_stages": 1}')
    assert launch_config(384, 30522)["BLOCK_M"] == 64
    monkeypatch.setenv("SPLATOPT_LINEAR_CE_CONFIG", '{"BLOCK_K": 32}')
    with pytest.raises(ValueError, match="<= 4"):
        launch_config(384, 30522)
    monkeypatch.setenv("SPLATOPT_LINEAR_CE_CONFIG", '{"BLOCK_X": 32}')
    with pytest.raises(ValueError, match="unknown"):
        launch_config(384, 30522)


# ------------------------------------------------------------------ objective_terms, fit, bench


def test_decode_parts_reassemble_the_decoder(model):
    field = torch.randn(2, 5, model.dim)
    features, embeddings, bias = model.decode_parts(field.device)
    assert embeddings.shape == (model.vocab_size, model.dim) and not bias.requires_grad
    torch.testing.assert_close(features(field) @ embeddings.T + bias, model.decode(field), rtol=1e-5, atol=1e-4)


class TinyDecoder:
    """A decoder exposing its parts as fixedpos.FieldModel does, around a small random DecoderHead."""

    def __init__(self, V=50, d=16, dtype=torch.float64, seed=0):
        import fixedpos

        g = torch.Generator().manual_seed(seed)
        self.head = fixedpos.DecoderHead(torch.randn(V, d, generator=g)).to(dtype).requires_grad_(False)
        with torch.no_grad():
            self.head.bias.copy_(torch.randn(V, generator=g))

    def decode(self, field):
        return self.head(field)

    def decode_parts(self, device):
        return self.head.features, self.head.embeddings, self.head.bias


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_objective_terms_fused_equals_reference_through_the_features(dtype, rtol):
    decoder = TinyDecoder(dtype=dtype)
    _, _, _, ids, mask = make_case(B=3, L=6, V=50, seed=8)
    g = torch.Generator().manual_seed(9)
    target = torch.randn(3, 6, 16, generator=g).to(dtype)
    field = (target + torch.randn(3, 6, 16, generator=g).to(dtype)).requires_grad_(True)
    objective = Objective.parse("mse+0.5*ce")
    out = {}
    for fused in (False, True):
        loss, terms = objective_terms(objective, field, target, mask, ids, decoder.decode, fused_ce=fused)
        out[fused] = (loss.detach(), terms["ce"].detach(), torch.autograd.grad(weighted(loss), field)[0])
    assert_matches(out[True], out[False], rtol)
    with pytest.raises(ValueError, match="decode_parts"):
        objective_terms(objective, field, target, mask, ids, lambda f: decoder.decode(f), fused_ce=True)


def test_objective_terms_with_the_default_model(model):
    batch = model.tokenize(["Return the sum of a and b.", "Open a file."])
    target = model.encode(batch)
    field = (target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    ids = torch.where(batch.mask, batch.ids, -100)
    objective = Objective.parse("mse+ce")
    out = {}
    for fused in (False, True):
        loss, terms = objective_terms(objective, field, target, batch.mask, ids, model.decode, fused_ce=fused)
        out[fused] = (loss, terms["ce"], torch.autograd.grad(loss.sum(), field)[0])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-7)
    # logits of ~170 resolve 1.5e-5 in float32: each path's field gradient is ~5e-5 (in norm) from
    # the float64 one, so they are compared at that level, not elementwise at 1e-5
    assert float((out[True][2] - out[False][2]).norm() / out[False][2].norm()) < 2e-4
    # None is the reference on the CPU, bit for bit
    loss, _ = objective_terms(objective, field, target, batch.mask, ids, model.decode)
    assert torch.equal(loss, out[False][0])


def test_fit_with_fused_ce_equals_the_materialized_fit(model):
    texts = ["Return code object from marshal string ms.", "Open a file and return a stream."]
    runs = [splatopt.fit(texts, model, n_splats=0.25, steps=10, record_every=5, device="cpu", progress=False,
                         fused_ce=fused) for fused in (False, True)]
    ref, got = runs
    assert torch.equal(got.token_accuracy, ref.token_accuracy) and got.texts == ref.texts
    for key in ("loss", "ce", "token_accuracy"):
        torch.testing.assert_close(got.history[key], ref.history[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.splats.mu, ref.splats.mu, rtol=1e-4, atol=1e-4)


def test_bench_times_the_decode_aware_paths(tmp_path, capsys, model):
    from splatopt.bench import BenchConfig, device_peak_flops, run_bench
    from splatopt.cli import main

    cfg = BenchConfig(batch=2, length=8, splats=2, dim=model.dim, objective="mse+ce", warmup=0, iters=1)
    out = run_bench(cfg, "cpu", ("eager", "fused_ce", "chunked_ce"), model=model, peak_tflops=2.0)
    assert out["projection_flops"] == 4 * 2 * 8 * model.dim * model.vocab_size
    for path in ("eager", "fused_ce", "chunked_ce"):
        r = out["results"][path]
        assert r["step_ms"] > 0 and r["speedup_vs_eager"] > 0
        assert r["tensor_core_fraction"] == pytest.approx(out["projection_flops"] / (r["step_ms"] / 1e3) / 2e12)
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and device_peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert device_peak_flops("Some Future GPU") is None
    with pytest.raises(ValueError, match="fused_ce"):
        run_bench(BenchConfig(batch=2, length=8, splats=2, dim=16), "cpu", ("fused_ce",))
    argv = ["bench", "--batch", "2", "--length", "8", "--splats", "2", "--objective", "mse+ce", "--warmup", "0",
            "--iters", "1", "--paths", "eager", "fused_ce", "--peak-tflops", "1", "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "of bf16 tensor-core peak" in capsys.readouterr().out
    (written,) = tmp_path.glob("*.json")
    assert set(json.loads(written.read_text())["results"]) == {"eager", "fused_ce"}


# ------------------------------------------------------------------ GPU


def _noisy_field(model, n=64, seed=6):
    """Encoded test prompts plus 1.5x their spread of noise: per-prompt cross-entropies of about 1-4
    (the exact field's are 1e-8: bf16 error would be measured against nothing)."""
    import fixedpos

    texts = fixedpos.sample_prompts(model, fixedpos.load_corpus("stdlib", "test"), n, max_tokens=64, seed=seed)
    batch = model.tokenize(texts, device="cuda")
    target = model.encode(batch)
    g = torch.Generator(device="cuda").manual_seed(seed)
    return target + 1.5 * target.std() * torch.randn(target.shape, device="cuda", generator=g), batch


@pytest.mark.cuda
def test_cuda_float32_and_bf16_paths(model):
    field, batch = _noisy_field(model)
    features, embeddings, bias = model.decode_parts(field.device)
    q = features(field).detach()
    ref = reference(q, embeddings, bias, batch.ids, batch.mask)
    assert_matches(chunked(q, embeddings, bias, batch.ids, batch.mask, chunk_rows=300), ref, 1e-4)  # Triton rows, fp32
    for impl in ("fused", "chunked"):  # the default on CUDA is the fused one-sweep kernel
        got = chunked(q, embeddings, bias, batch.ids, batch.mask, compute_dtype=torch.bfloat16, impl=impl)
        torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=1e-2)
        # bf16 operands move each logit by ~2^-8 of its terms: the softmax gradient follows less closely
        assert float((got[1] - ref[1]).norm() / ref[1].norm()) < 5e-2


@pytest.mark.cuda
def test_cuda_peak_memory_is_a_chunk_not_the_logits(model):
    B, L = 512, 64  # 32768 rows: float32 logits 4 GB
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(B, L, model.dim, device="cuda", generator=g, requires_grad=True)
    ids = torch.randint(model.vocab_size, (B, L), device="cuda", generator=g)
    mask = torch.ones(B, L, dtype=torch.bool, device="cuda")
    _, embeddings, bias = model.decode_parts(q.device)
    logits_bytes = B * L * model.vocab_size * 4

    def extra(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(fn().sum(), q)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = extra(lambda: linear_cross_entropy(q, embeddings, bias, ids, mask, compute_dtype=torch.bfloat16))
    materialized = extra(lambda: decode_cross_entropy(q @ embeddings.T + bias, ids, mask))
    assert materialized > logits_bytes and fused < 0.2 * logits_bytes, (fused / 1e9, materialized / 1e9)


@pytest.mark.cuda
def test_cuda_fused_kernel_matches_the_chunked_path_at_full_size():
    """B = 64, L = 64, d = 384, V = 30522, random head: the one-sweep kernel against the chunked
    bf16 path (its reference on the GPU) and float32; its extra memory is the gradient and a bf16
    copy of W, nothing of size rows x V."""
    B, L, d, V = 64, 64, 384, 30522
    g = torch.Generator(device="cuda").manual_seed(15)
    q = torch.randn(B, L, d, device="cuda", generator=g)
    weight = torch.randn(V, d, device="cuda", generator=g) / d**0.25  # logits of spread ~4
    bias = torch.randn(V, device="cuda", generator=g)
    ids = torch.randint(V, (B, L), device="cuda", generator=g)
    mask = torch.rand(B, L, device="cuda", generator=g) < 0.8
    mask[0] = True
    ids = torch.where(mask, ids, -100)
    bf16 = dict(compute_dtype=torch.bfloat16)
    got = chunked(q, weight, bias, ids, mask, impl="fused", **bf16)
    ref = chunked(q, weight, bias, ids, mask, impl="chunked", **bf16)
    exact = chunked(q.double(), weight.double(), bias.double(), ids, mask, chunk_rows=512)
    for other, tol in ((ref, 2e-2), (exact, 3e-2)):
        torch.testing.assert_close(got[0].double(), other[0].double(), rtol=1e-2, atol=1e-2)
        assert float((got[1].double() - other[1].double()).norm() / other[1].double().norm()) < tol
    q.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(linear_cross_entropy(q, weight, bias, ids, mask, impl="fused", **bf16).sum(), q)
    extra = torch.cuda.max_memory_allocated() - base
    budget = 3 * q.numel() * 4 + (V + 128) * d * 2 + 8 * B * L * 4  # grad (+ backward's copy), W in bf16, per-row
    assert extra < budget < 0.1 * B * L * V * 4, (extra / 1e6, budget / 1e6)
