"""The sparse training path (hsae.models.sparse) against the dense computation: values and gradients
of the decoder, the selections, and whole fused TopK / BatchTopK training steps (with and without
AuxK) against a plain dense PyTorch reference and against each family's own `forward`."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

from hsae.models import StepContext, families, get_family
from hsae.models.base import SAE, AutogradStep
from hsae.models.codes import SparseCodes
from hsae.models.sparse import cpu_select
from hsae.models.sparse.ops import sparse_decode
from hsae.models.sparse.selection import (
    batch_topk_select,
    encode_topk_chunked,
    masked_topk_select,
    topk_select,
)
from hsae.models.sparse.steps import FusedTopKStep

DTYPE = torch.float64


def _close(a, b, rtol=1e-9, atol=1e-9):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ----- decoder ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_decode_equals_dense_values_and_gradients(ragged, dtype):
    torch.manual_seed(0)
    n, m, d, k = 37, 50, 12, 5
    W = torch.randn(m, d, dtype=dtype, requires_grad=True)
    pre = torch.randn(n, m, dtype=dtype)
    if ragged:
        pre[3] = -1.0  # an empty row
        codes = SparseCodes.from_dense(pre * (pre > 1.0))  # variable count per row
        assert codes.l0().min() == 0
    else:
        v, i = pre.topk(k, dim=-1)
        codes = SparseCodes(i, v, m)
    vals = codes.values.clone().requires_grad_(True)
    out = sparse_decode(codes.indices, vals, W, codes.offsets)
    dense = SparseCodes(codes.indices, vals, m, codes.offsets).dense()
    ref = dense @ W
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    _close(out, ref, **tol)
    g = torch.randn(n, d, dtype=dtype)
    gv, gw = torch.autograd.grad(out, (vals, W), g)
    rv, rw = torch.autograd.grad(ref, (vals, W), g)
    _close(gv, rv, **tol)
    _close(gw, rw, **tol)


def test_sparse_decode_one_sided_gradients():
    torch.manual_seed(1)
    W = torch.randn(20, 6, dtype=DTYPE, requires_grad=True)
    idx = torch.randint(0, 20, (9, 3))
    vals = torch.randn(9, 3, dtype=DTYPE)
    (gw,) = torch.autograd.grad(sparse_decode(idx, vals, W).square().sum(), W)
    dense = torch.zeros(9, 20, dtype=DTYPE).scatter_add(1, idx, vals)
    (rw,) = torch.autograd.grad((dense @ W).square().sum(), W)
    _close(gw, rw)
    vals.requires_grad_(True)
    Wc = W.detach()
    (gv,) = torch.autograd.grad(sparse_decode(idx, vals, Wc).square().sum(), vals)
    (rv,) = torch.autograd.grad((torch.zeros(9, 20, dtype=DTYPE).scatter_add(1, idx, vals) @ Wc).square().sum(), vals)
    _close(gv, rv)


# ----- selection -------------------------------------------------------------------------------------
def _as_set(rows, cols):
    return set(zip(rows.tolist(), cols.tolist(), strict=False))


@pytest.mark.parametrize("shape,k", [((64, 96), 4), ((50, 37), 3), ((8, 16), 16), ((100, 64), 1)])
def test_batch_topk_select_equals_flat_topk(shape, k):
    torch.manual_seed(4)
    pre = torch.randn(*shape)
    n, m = shape
    ref_v, ref_flat = pre.reshape(-1).topk(min(k * n, n * m))
    keep = ref_v > 0
    ref = _as_set(ref_flat[keep] // m, ref_flat[keep] % m)
    vals, idx, off = batch_topk_select(pre, k)
    rows = torch.arange(n).repeat_interleave(off.diff())
    assert _as_set(rows, idx) == ref
    _close(vals, pre[rows, idx], rtol=0, atol=0)
    assert off[0] == 0 and off[-1] == idx.numel()
    for r in range(n):  # latents in order within each row
        seg = idx[off[r] : off[r + 1]]
        assert torch.all(seg[1:] > seg[:-1])


def test_masked_topk_and_chunked_encode_equal_reference():
    torch.manual_seed(5)
    n, d, m, k = 70, 8, 48, 5
    xc, W, b = torch.randn(n, d), torch.randn(d, m), torch.randn(m)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m)[:11]] = True
    cols = dead.nonzero().squeeze(1)
    pre = torch.addmm(b, xc, W)
    sel = encode_topk_chunked(xc, W, b, k, dead_cols=cols, k_aux=7, chunk_rows=16)
    ref_v, ref_i = pre.topk(k, dim=-1)
    assert torch.equal(sel.indices.sort(-1).values, ref_i.sort(-1).values)
    _close(sel.values.sort(-1).values, ref_v.relu().sort(-1).values, rtol=1e-6, atol=1e-6)
    ref_av, ref_ai = pre.masked_fill(~dead, float("-inf")).topk(7, dim=-1)
    assert torch.equal(sel.aux_indices.sort(-1).values, ref_ai.sort(-1).values)
    _close(sel.aux_values.sort(-1).values, ref_av.relu().sort(-1).values, rtol=1e-6, atol=1e-6)
    mv, mi = masked_topk_select(pre, cols, 7)
    assert torch.equal(mi.sort(-1).values, ref_ai.sort(-1).values)


# ----- whole training steps against a dense PyTorch reference ------------------------------------------
def _dense_reference(model: SAE, x: torch.Tensor, ctx: StepContext | None, batch: bool) -> tuple[dict, torch.Tensor]:
    """Plain dense formulation: dense codes, dense decoder matmul, masked-fill AuxK, autograd."""
    cfg = model.config
    xn = x * cfg.input_scale
    pre = (xn - model.b_dec) @ model.W_enc + model.b_enc
    n, m = pre.shape
    if batch:
        v, flat = pre.reshape(-1).topk(cfg.k * n)
        dense = torch.zeros(n * m, dtype=pre.dtype).index_put((flat,), v.relu()).view(n, m)
    else:
        v, i = pre.topk(cfg.k, dim=-1)
        dense = torch.zeros_like(pre).scatter(1, i, v.relu())
    xn_hat = dense @ model.W_dec + model.b_dec
    losses = {"mse": (xn_hat - xn).pow(2).sum(-1).mean()}
    if ctx is not None and ctx.dead_mask is not None and ctx.dead_mask.any():
        k_aux = min(model.aux_k(), int(ctx.dead_mask.sum()))
        av, ai = pre.masked_fill(~ctx.dead_mask, float("-inf")).topk(k_aux, dim=-1)
        aux_dense = torch.zeros_like(pre).scatter(1, ai, av.relu())
        residual = (xn - xn_hat).detach()
        losses["auxk"] = cfg.aux_coef * (aux_dense @ model.W_dec - residual).pow(2).sum(-1).mean()
    return losses, dense


def _model(arch: str, **kw) -> SAE:
    fam = get_family(arch)
    cfg = fam.config_class(arch=arch, d_in=16, n_latents=64, k=4, input_scale=1.3, **kw)
    cfg.validate()
    torch.manual_seed(7)
    model = fam.from_config(cfg).double().train()
    with torch.no_grad():
        model.b_dec.normal_(0, 0.1)
        model.b_enc.normal_(0, 0.1)
        model.W_enc.add_(0.05 * torch.randn_like(model.W_enc))
    return model


GRAD_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


@pytest.fixture(params=["dense-auxk", "sparse-auxk"])
def aux_form(request):
    """Both AuxK forms of the fused step: dense blocks over the dead columns, and sparse entries
    (a step that never takes the dense block)."""
    return request.param


def _step(model: SAE, aux_form: str = "dense-auxk", **options) -> FusedTopKStep:
    """The model's declared fused step, with the AuxK form of `aux_form` and other options."""
    step = type(model).train_step
    assert not isinstance(step, AutogradStep)
    if aux_form == "sparse-auxk":
        options["dense_auxk_max_elements"] = 0
    return dataclasses.replace(step, **options)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_aux", [False, True])
def test_training_step_equals_dense_reference(arch, with_aux, aux_form):
    model = _model(arch)
    ref_model = copy.deepcopy(model)
    torch.manual_seed(8)
    x = torch.randn(40, 16, dtype=torch.float64)
    dead = None
    if with_aux:
        dead = torch.zeros(64, dtype=torch.bool)
        dead[::3] = True
    ctx = StepContext(step=0, total_steps=10, dead_mask=dead)
    out = _step(model, aux_form)(model, x, ctx)
    assert isinstance(out.codes, SparseCodes) and out.codes.is_ragged == (arch == "batchtopk")
    assert set(out.losses) == ({"mse", "auxk"} if with_aux else {"mse"})
    ref_losses, ref_dense = _dense_reference(ref_model, x, ctx, batch=arch == "batchtopk")
    for name in ref_losses:
        _close(out.losses[name], ref_losses[name])
    _close(out.codes.dense().detach(), ref_dense.detach())
    _close(out.x_hat * model.config.input_scale, (ref_dense @ ref_model.W_dec + ref_model.b_dec).detach())
    out.loss.backward()
    sum(ref_losses.values()).backward()
    for name in GRAD_NAMES:
        _close(getattr(model, name).grad, getattr(ref_model, name).grad)


FUSED_FAMILIES = [name for name, fam in families().items() if not isinstance(fam.train_step, AutogradStep)]


def test_the_fused_families_are_the_topk_style_ones():
    assert FUSED_FAMILIES == ["batchtopk", "matryoshka", "msae", "topk"]
    assert isinstance(get_family("tree").train_step, AutogradStep)  # its gate is not TopK's


@pytest.mark.parametrize("arch", FUSED_FAMILIES)
@pytest.mark.parametrize("with_aux", [False, True])
def test_every_declared_fused_step_equals_the_familys_own_forward(arch, with_aux, aux_form):
    """Whatever a family declares as its fused step must compute what its own `forward` does
    (losses, codes, reconstruction and all gradients): a subclass that changes `activate` or the
    losses but inherits a fused step fails here."""
    model = _model(arch)
    ref = copy.deepcopy(model)
    torch.manual_seed(30)
    x = torch.randn(40, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = with_aux
    ctx = StepContext(step=0, total_steps=10, dead_mask=dead)
    torch.manual_seed(31)  # the same draws (sampled groups) on both
    out = _step(model, aux_form)(model, x, ctx)
    torch.manual_seed(31)
    ref_out = ref(x, ctx)
    assert set(out.losses) == set(ref_out.losses)
    for name in ref_out.losses:
        _close(out.losses[name], ref_out.losses[name])
    _close(out.x_hat, ref_out.x_hat)
    _close(out.codes.dense().detach(), ref_out.codes.dense().detach())
    out.loss.backward()
    ref_out.loss.backward()
    for name in GRAD_NAMES:
        _close(getattr(model, name).grad, getattr(ref, name).grad)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_and_dense_paths_train_to_the_same_weights(arch, aux_form):
    """A few Adam steps of the real loop pieces: the fused step and the family's dense `forward` end
    with the same weights (up to float rounding) and the same threshold."""
    model = _model(arch, aux_k=6).float()
    ref = copy.deepcopy(model)
    opts = [torch.optim.Adam(mdl.parameters(), lr=1e-2) for mdl in (model, ref)]
    torch.manual_seed(9)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    for step in range(6):
        x = torch.randn(32, 16)
        ctx = StepContext(step=step, total_steps=6, dead_mask=dead if step % 2 else None)
        for mdl, opt, dense in ((model, opts[0], False), (ref, opts[1], True)):
            out = mdl(x, ctx) if dense else _step(mdl, aux_form)(mdl, x, ctx)
            opt.zero_grad()
            out.loss.backward()
            mdl.remove_parallel_decoder_grad()
            opt.step()
            mdl.normalize_decoder()
    for name in GRAD_NAMES:
        _close(getattr(model, name), getattr(ref, name), rtol=1e-4, atol=1e-5)
    if arch == "batchtopk":
        _close(model.threshold, ref.threshold, rtol=1e-4, atol=1e-6)


def test_training_forward_runs_the_declared_step_and_forward_stays_dense():
    """`training_forward` is the family's declared step; `forward` (what eval runs) is the dense
    formulation whatever the mode, and both give the same reconstruction."""
    model = _model("topk")
    x = torch.randn(10, 16, dtype=torch.float64)
    ctx = StepContext(step=0, total_steps=10)
    fused = model.training_forward(x, ctx)
    with torch.no_grad():
        a = model(x)
    b = model.eval()(x)
    _close(a.x_hat, b.x_hat)
    _close(fused.x_hat.detach(), b.x_hat)


def test_bf16_screened_selection_gives_exact_values_and_gradients():
    """compute_dtype=bfloat16: a bf16 matmul chooses the entries, their values are the exact float32
    pre-activations. The fused step equals the family's own (screened) forward, and both equal a
    plain float32 computation at the bf16-chosen entries: loss, codes and gradients."""
    torch.manual_seed(10)
    m32 = _model("topk").float()
    m16 = copy.deepcopy(m32)
    m16.config.compute_dtype = "bfloat16"
    x = torch.randn(64, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::5] = True
    ctx = StepContext(step=0, total_steps=1, dead_mask=dead)
    fused = m16.training_forward(x, ctx)
    own = copy.deepcopy(m16)
    own_out = own(x, ctx)
    _close(fused.loss, own_out.loss, rtol=1e-5, atol=1e-6)
    fused.loss.backward()
    own_out.loss.backward()
    ref = copy.deepcopy(m32)
    xc = x * ref.config.input_scale - ref.b_dec
    pre32 = xc @ ref.W_enc + ref.b_enc
    pre16 = (xc.bfloat16() @ ref.W_enc.bfloat16()).float() + ref.b_enc
    i = pre16.detach().topk(ref.config.k, dim=-1).indices
    codes = torch.zeros_like(pre32).scatter(1, i, pre32.gather(1, i).relu())
    xn_hat = codes @ ref.W_dec + ref.b_dec
    loss = (xn_hat - x * ref.config.input_scale).pow(2).sum(-1).mean()
    k_aux = min(ref.aux_k(), int(dead.sum()))
    ai = pre16.detach().masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1).indices
    aux = torch.zeros_like(pre32).scatter(1, ai, pre32.gather(1, ai).relu())
    loss = (
        loss
        + ref.config.aux_coef * (aux @ ref.W_dec - (x * ref.config.input_scale - xn_hat).detach()).pow(2).sum(-1).mean()
    )
    _close(fused.loss, loss, rtol=1e-5, atol=1e-6)
    _close(fused.codes.dense().detach(), codes.detach(), rtol=1e-5, atol=1e-6)  # exact float32 values
    loss.backward()
    for name in GRAD_NAMES:
        _close(getattr(m16, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-5)
        _close(getattr(own, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-5)
    # inference encodes the same way: bf16 chooses, values exact
    m16.eval()
    _close(m16.encode(x).dense(), codes.detach(), rtol=1e-5, atol=1e-6)
    # the bf16 screen picks nearly the fp32 entries (it may differ only at near-ties)
    agree = (codes != 0) & (torch.zeros_like(pre32).scatter(1, pre32.topk(ref.config.k, dim=-1).indices, 1.0) != 0)
    assert float(agree.sum()) / float((codes != 0).sum()) > 0.9


@pytest.mark.filterwarnings("error")  # a kernel that fails to compile must fail here, not fall back
@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch-ops"])
@pytest.mark.parametrize("n,m,k", [(50, 512, 8), (33, 6144, 32), (20, 96, 3), (10, 100, 7), (5, 64, 64)])
def test_topk_select_equals_torch_topk(n, m, k, compiled):
    if compiled and not cpu_select.enabled():
        pytest.skip("numba is not importable here")
    torch.manual_seed(11)
    pre = torch.randn(n, m)
    vals, idx = topk_select(pre, k, compiled=compiled)
    ref_v, ref_i = pre.topk(k, dim=-1)
    assert torch.equal(idx.sort(-1).values, ref_i.sort(-1).values)
    _close(vals.sort(-1).values, ref_v.relu().sort(-1).values, rtol=0, atol=0)


def _hard_rows(m: int) -> torch.Tensor:
    """Rows that exercise the compiled selection's edge cases."""
    torch.manual_seed(5)
    rows = [
        torch.randn(m),
        torch.randint(0, 4, (m,)).float(),  # massive ties: the fallback (too many candidates)
        torch.randint(0, 40, (m,)).float(),  # ties at the threshold
        torch.zeros(m),  # all equal
        -torch.rand(m) - 1,  # all negative: values ReLU to 0, indices still the top k
        torch.where(torch.rand(m) < 0.5, torch.tensor(float("-inf")), torch.randn(m)),
        torch.cat([torch.full((m - 40,), -1.0), torch.arange(40.0)]),  # the top k in the last blocks
        torch.linspace(-3, 3, m),  # sorted: the top k in a few strided blocks
        torch.randn(m).exp().mul(1e30),  # large magnitudes
        torch.randn(m) * torch.rand(m).pow(8) * 5 + torch.randn(m) * 0.01,  # heavy-tailed
    ]
    return torch.stack(rows)


@pytest.mark.skipif(not cpu_select.enabled(), reason="numba is not importable here")
@pytest.mark.filterwarnings("error")  # a kernel that fails to compile must fail here, not fall back
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k", [(6144, 32), (512, 16), (256, 1), (96, 3)])
def test_compiled_topk_select_edge_cases(m, k, dtype):
    pre = _hard_rows(m).to(dtype)
    vals, idx = topk_select(pre, k, compiled=True)
    ref_v, _ = pre.topk(k, dim=-1)
    assert idx.dtype == torch.long and vals.dtype == dtype
    for r in range(pre.shape[0]):
        assert idx[r].unique().numel() == k  # distinct latents
        # the selected entries are the top k (which of equal values is taken is unspecified)
        assert torch.equal(pre[r, idx[r]].sort().values, ref_v[r].sort().values)
    _close(vals, pre.gather(1, idx).relu(), rtol=0, atol=0)


@pytest.mark.skipif(not cpu_select.enabled(), reason="numba is not importable here")
def test_compiled_topk_select_nan_rows_fall_back_to_torch_topk():
    pre = torch.randn(6, 512)
    pre[1, 17] = float("nan")
    pre[4] = float("nan")
    vals, idx = topk_select(pre, 8, compiled=True)
    ref_v, ref_i = pre.topk(8, dim=-1)
    assert torch.equal(idx.sort(-1).values, ref_i.sort(-1).values)
    assert torch.equal(vals.sort(-1).values.isnan(), ref_v.relu().sort(-1).values.isnan())


@pytest.mark.skipif(not cpu_select.enabled(), reason="numba is not importable here")
def test_compiled_topk_select_writes_into_slices_and_keeps_torch_threads():
    torch.manual_seed(3)
    pre = torch.randn(40, 1024)
    values, indices = torch.full((100, 8), -1.0), torch.full((100, 8), -1, dtype=torch.long)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        v, i = topk_select(pre, 8, values[30:70], indices[30:70], compiled=True)
        assert torch.get_num_threads() == 1  # starting numba's threads must not change torch's count
    finally:
        torch.set_num_threads(threads)
    assert v.data_ptr() == values[30:70].data_ptr() and i.data_ptr() == indices[30:70].data_ptr()
    assert (values[:30] == -1).all() and (values[70:] == -1).all()
    assert torch.equal(indices[30:70].sort(-1).values, pre.topk(8, dim=-1).indices.sort(-1).values)
    # a non-contiguous input and an output that is not a plain (n, k) block still work
    v, i = topk_select(pre.t().contiguous().t(), 8, compiled=True)
    assert torch.equal(i.sort(-1).values, pre.topk(8, dim=-1).indices.sort(-1).values)


@pytest.mark.skipif(not cpu_select.enabled(), reason="numba is not importable here")
@pytest.mark.filterwarnings("error")  # a kernel that fails to compile must fail here, not fall back
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [512, 96, 100])
def test_compiled_entries_at_least_equal_torch_ops(m, dtype, monkeypatch):
    """BatchTopK's candidate filter: the compiled kernel keeps exactly the entries the torch ops keep."""
    from hsae.models.sparse.selection import _entries_at_least

    pre = torch.cat([_hard_rows(m), torch.randn(30, m)]).to(dtype)
    pre[3, 5] = float("nan")
    pre[12, :: max(1, m // 7)] = float("nan")  # NaNs among positive entries of their blocks
    for thr in (float("-inf"), -0.5, 0.0, 1e-310, 0.3, 1.7, 1e31, 1 / 3, float("inf")):
        pos, vals = _entries_at_least(pre, thr)
        pos32, vals32 = _entries_at_least(pre, thr, torch.int32)  # the collector's narrow positions
        monkeypatch.setenv("HSAE_NUMBA", "0")
        ref_pos, ref_vals = _entries_at_least(pre, thr)
        ref_pos32, _ = _entries_at_least(pre, thr, torch.int32)
        monkeypatch.delenv("HSAE_NUMBA")
        order, ref_order = pos.argsort(), ref_pos.argsort()
        assert torch.equal(pos[order], ref_pos[ref_order])
        assert torch.equal(vals[order], ref_vals[ref_order])
        assert torch.equal(vals, pre.reshape(-1)[pos])
        assert pos32.dtype == ref_pos32.dtype == torch.int32
        assert torch.equal(pos32.long(), pos) and torch.equal(vals32, vals) and torch.equal(ref_pos32.long(), ref_pos)


@pytest.mark.skipif(not cpu_select.enabled(), reason="numba is not importable here")
def test_a_kernel_that_fails_to_compile_falls_back_to_torch_ops_with_a_warning(monkeypatch):
    from hsae.models.sparse.selection import _entries_at_least

    def broken(*args):
        raise cpu_select.CompileError("no LLVM target here")

    monkeypatch.setattr(cpu_select, "_select_rows", broken)
    monkeypatch.setattr(cpu_select, "_disabled", None)
    pre = torch.randn(20, 512)
    with pytest.warns(UserWarning, match="no LLVM target here.*torch ops"):
        vals, idx = topk_select(pre, 8)
    assert torch.equal(idx.sort(-1).values, pre.topk(8, dim=-1).indices.sort(-1).values)
    assert not cpu_select.enabled()  # once: later calls go straight to the torch ops
    pos, _ = _entries_at_least(pre, 1.0)
    assert torch.equal(pos.sort().values, (pre.reshape(-1) >= 1.0).nonzero().squeeze(1))


def test_topk_select_of_zero_entries():
    for compiled in (True, False):
        vals, idx = topk_select(torch.randn(3, 64), 0, compiled=compiled)
        assert vals.shape == idx.shape == (3, 0)


@pytest.mark.skipif(not cpu_select.enabled() or not hasattr(os, "fork"), reason="needs numba and fork()")
def test_forked_child_selects_with_torch_ops():
    """GNU OpenMP cannot start a thread team in a forked child of a process that used one (the
    child is killed): children of a process that ran the kernels select with torch ops instead."""
    pre = torch.randn(64, 512)
    topk_select(pre, 8)  # the parent starts numba's (OpenMP) threads
    ref = pre.topk(8, dim=-1).indices.sort(-1).values
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if it selects correctly and knows it is forked
        code = 1
        try:
            _, idx = topk_select(pre, 8)
            code = 0 if torch.equal(idx.sort(-1).values, ref) and not cpu_select.enabled() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert cpu_select.enabled()  # the parent keeps its kernels


@pytest.mark.skipif(not cpu_select.enabled(), reason="numba is not importable here")
def test_compiled_selection_from_several_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor

    pres = [torch.randn(256, 1024) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: topk_select(p, 16)[1], pres))
    for p, idx in zip(pres, results, strict=False):
        assert torch.equal(idx.sort(-1).values, p.topk(16, dim=-1).indices.sort(-1).values)


# ----- chunked BatchTopK, the fused sparse step ------------------------------------------------------
def _flat_topk_positive(pre, k):
    n, m = pre.shape
    v, flat = pre.reshape(-1).topk(min(k * n, n * m))
    return v[v > 0], flat[v > 0]


def _check_batch_selection(pre, k, vals, idx, off, ties=False):
    n, m = pre.shape
    ref_v, ref_flat = _flat_topk_positive(pre, k)
    rows = torch.arange(n).repeat_interleave(off.diff())
    assert off[0] == 0 and off[-1] == idx.numel() == ref_v.numel()
    _close(vals, pre[rows, idx], rtol=0, atol=0)
    for r in range(n):  # latents in order (and distinct) within each row
        seg = idx[off[r] : off[r + 1]]
        assert torch.all(seg[1:] > seg[:-1])
    if ties:  # the same multiset of values (which of equal entries is taken is unspecified)
        assert torch.equal(vals.sort().values, ref_v.sort().values)
    else:
        assert _as_set(rows, idx) == _as_set(ref_flat // m, ref_flat % m)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
@pytest.mark.parametrize("shape,k", [((64, 96), 4), ((50, 37), 3), ((8, 16), 16), ((100, 64), 1), ((33, 48), 40)])
def test_batch_topk_select_in_chunks_equals_flat_topk(shape, k, chunk):
    torch.manual_seed(12)
    pre = torch.randn(*shape)
    _check_batch_selection(pre, k, *batch_topk_select(pre, k, chunk_rows=chunk))


@pytest.mark.parametrize("chunk", [3, 16, 200])
def test_batch_topk_collector_hints_and_edge_cases(chunk):
    from hsae.models.sparse.selection import BatchTopKCollector

    torch.manual_seed(13)
    n, m, k = 60, 80, 5

    def run(pre, hint):
        col = BatchTopKCollector(n, m, k, hint=hint)
        for s in range(0, n, chunk):
            col.add(pre[s : s + chunk], s)
        return col.finish()

    pre = torch.randn(n, m)
    kth = float(pre.reshape(-1).topk(k * n).values[-1])
    for hint in (None, -1.0, 0.0, 0.5 * kth, 0.999 * kth, kth):  # at or below the (k n)-th largest: exact
        _check_batch_selection(pre, k, *run(pre, hint))
    assert run(pre, kth * 1.01 + 1e-6) is None  # above it: the caller must recompute
    # Fewer than k n positive entries: all the positive ones; a positive hint cannot be trusted then.
    sparse_pre = torch.randn(n, m) - 3.0
    assert 0 < int((sparse_pre > 0).sum()) < k * n
    _check_batch_selection(sparse_pre, k, *run(sparse_pre, None))
    _check_batch_selection(sparse_pre, k, *run(sparse_pre, -0.5))
    assert run(sparse_pre, 0.01) is None
    # No positive entry at all: empty codes.
    vals, idx, off = run(-torch.rand(n, m), None)
    assert vals.numel() == 0 and torch.equal(off, torch.zeros(n + 1, dtype=torch.long))
    # Ties at the threshold (integer values): exactly k n entries, the same multiset of values.
    tied = torch.randint(-3, 4, (n, m)).float()
    for hint in (None, 1.0):
        _check_batch_selection(tied, k, *run(tied, hint), ties=True)


@pytest.mark.parametrize("hint_scale", [None, 0.5, 5.0])
def test_encode_batch_topk_chunked_equals_dense_selection(hint_scale):
    from hsae.models.sparse.selection import encode_batch_topk_chunked

    torch.manual_seed(14)
    n, d, m, k = 70, 8, 48, 3
    x, W, be, bd = torch.randn(n, d), torch.randn(d, m), torch.randn(m), torch.randn(d)
    scale = 1.7
    pre = torch.addmm(be, x * scale - bd, W)
    kth = float(pre.reshape(-1).topk(k * n).values[-1])
    dead = torch.zeros(m, dtype=torch.bool)
    dead[::5] = True
    cols = dead.nonzero().squeeze(1)
    sel = encode_batch_topk_chunked(
        x,
        W,
        be,
        k,
        dead_cols=cols,
        k_aux=4,
        chunk_rows=9,
        scale=scale,
        b_dec=bd,
        hint=None if hint_scale is None else kth * hint_scale,
    )
    assert sel.recomputed == (hint_scale == 5.0)
    _check_batch_selection(pre, k, sel.values, sel.indices, sel.offsets)
    ref_ai = pre.masked_fill(~dead, float("-inf")).topk(4, dim=-1).indices
    assert torch.equal(sel.aux_indices.sort(-1).values, ref_ai.sort(-1).values)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("chunk", [5, 16])
def test_training_step_in_small_chunks_equals_dense_reference(arch, chunk, aux_form):
    """Several row chunks (BatchTopK's candidates cross chunk boundaries), AuxK on, a second step
    that uses the first one's hint."""
    model = _model(arch)
    step = _step(model, aux_form, chunk_rows=chunk)
    ref_model = copy.deepcopy(model)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[1::4] = True
    fused = step
    for step in range(2):
        torch.manual_seed(20 + step)
        x = torch.randn(40, 16, dtype=torch.float64)
        ctx = StepContext(step=step, total_steps=10, dead_mask=dead)
        out = fused(model, x, ctx)
        ref_losses, ref_dense = _dense_reference(ref_model, x, ctx, batch=arch == "batchtopk")
        for name in ref_losses:
            _close(out.losses[name], ref_losses[name])
        _close(out.codes.dense().detach(), ref_dense.detach())
        for mdl in (model, ref_model):
            for p in mdl.parameters():
                p.grad = None
        out.loss.backward()
        sum(ref_losses.values()).backward()
        for name in GRAD_NAMES:
            _close(getattr(model, name).grad, getattr(ref_model, name).grad)
    if arch == "batchtopk":
        assert model.hint_misses == 0 or model.hint_misses <= 1


def test_sparse_step_gradient_through_x_hat_and_single_backward():
    """x_hat is differentiable too (a loss on it backpropagates like the dense formulation's), and a
    second backward through the same step is refused rather than silently wrong."""
    model = _model("topk")
    ref = copy.deepcopy(model)
    torch.manual_seed(15)
    x = torch.randn(30, 16, dtype=torch.float64)
    w = torch.randn(30, 16, dtype=torch.float64)
    out = model.training_forward(x, StepContext(step=0, total_steps=1))
    loss = out.loss + (out.x_hat * w).sum()
    ref_out = ref(x)
    ref_loss = ref_out.loss + (ref_out.x_hat * w).sum()
    loss.backward(retain_graph=True)
    ref_loss.backward()
    for name in GRAD_NAMES:
        _close(getattr(model, name).grad, getattr(ref, name).grad)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_remove_parallel_component_matches_base():
    from hsae.models.sparse.ops import remove_parallel_component_

    torch.manual_seed(16)
    w = torch.randn(1100, 7, dtype=DTYPE)
    w /= w.norm(dim=1, keepdim=True)
    g = torch.randn(1100, 7, dtype=DTYPE)
    ref = g - (g * w).sum(-1, keepdim=True) * w
    remove_parallel_component_(g, w)
    _close(g, ref)


def test_grad_w_enc_segment_sum_gpu_form_equals_cpu_blocks():
    """The GPU takes grad W_enc as one segment sum then a transpose; the CPU block by block. Both
    are checked here on the CPU (no GPU in CI)."""
    from hsae.models.sparse.ops import _segment_sum_transposed_whole, group_by_latent, segment_sum_transposed

    g = torch.Generator().manual_seed(3)
    n, d, m, nnz = 60, 9, 700, 900  # m not a multiple of the block: a partial last block
    rows = torch.randint(0, n, (nnz,), generator=g)
    cols = torch.randint(0, m, (nnz,), generator=g)
    cols[:50] = 5  # a latent with many entries, and (with m >> nnz / 2) many without any
    w = torch.randn(nnz, generator=g, dtype=DTYPE)
    table = torch.randn(n, d, generator=g, dtype=DTYPE)
    b_dec, colsum = torch.randn(d, generator=g, dtype=DTYPE), torch.randn(m, generator=g, dtype=DTYPE)
    order, ptr = group_by_latent(cols, m)
    blocks = segment_sum_transposed(rows[order], w[order], table, ptr, 1.3, b_dec, colsum)
    whole = _segment_sum_transposed_whole(rows[order], w[order], table, ptr, 1.3, b_dec, colsum)
    dense = torch.zeros(m, d, dtype=DTYPE).index_add_(0, cols, w[:, None] * table[rows])
    _close(blocks, whole)
    _close(blocks, 1.3 * dense.t() - torch.outer(b_dec, colsum))
    assert whole.shape == (d, m) and whole.is_contiguous()
    # a second entry set (int16 rows, as the Matryoshka step's AuxK entries): its sums per latent add up
    rows2 = torch.randint(0, n, (300,), generator=g)
    cols2 = torch.randint(0, m, (300,), generator=g)
    w2 = torch.randn(300, generator=g, dtype=DTYPE)
    order2, ptr2 = group_by_latent(cols2, m)
    more = (rows2[order2].to(torch.int16), w2[order2], ptr2)
    blocks = segment_sum_transposed(rows[order], w[order], table, ptr, 1.3, b_dec, colsum, more)
    whole = _segment_sum_transposed_whole(rows[order], w[order], table, ptr, 1.3, b_dec, colsum, more)
    dense.index_add_(0, cols2, w2[:, None] * table[rows2])
    _close(blocks, whole)
    _close(blocks, 1.3 * dense.t() - torch.outer(b_dec, colsum))


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch-ops"])
def test_entry_sets_sorted_apart_give_the_sums_of_one_set(compiled, monkeypatch):
    """What the Matryoshka step's backward relies on when it sorts the codes and the AuxK entries
    apart: int16 bag ids sort like int32 ones; per-latent value sums of the second set added after
    the first's (latent_sums_) are bitwise those of one pass over each latent's entries in order;
    segment sums accumulated set by set equal the dense sum."""
    from hsae.models.sparse.ops import latent_sums_, segment_sum_into, sort_entries_by_latent

    if compiled and not cpu_select.enabled():
        pytest.skip("numba is not importable here")
    if not compiled:
        monkeypatch.setenv("HSAE_NUMBA", "0")
    g = torch.Generator().manual_seed(9)
    n, d, m = 50, 6, 300

    def entries(nnz):
        off = torch.zeros(n + 1, dtype=torch.int32)
        off[1:] = torch.randint(0, 2 * nnz // n + 1, (n,), generator=g).cumsum(0)
        off[-1] = nnz
        off = off.clamp(max=nnz)
        return torch.randint(0, m, (nnz,), generator=g, dtype=torch.int32), torch.rand(nnz, generator=g), off

    sets = [entries(400), entries(900)]
    table = torch.randn(n, d, generator=g)
    ref_gb = torch.zeros(m)
    ref_out = torch.zeros(m, d)
    out = torch.empty(m, d)
    gb = torch.zeros(m)
    for i, (cols, vals, off) in enumerate(sets):
        rows = torch.arange(n).repeat_interleave(off.diff(), output_size=cols.numel())
        bags16, vals16, ptr16 = sort_entries_by_latent([cols, vals], off, m, torch.int32, torch.int16)
        bags32, vals32, ptr32 = sort_entries_by_latent([cols, vals], off, m, torch.int32)
        order = torch.sort(cols, stable=True).indices
        assert bags16.dtype == torch.int16 and torch.equal(bags16.int(), bags32) and torch.equal(ptr16, ptr32)
        assert torch.equal(bags32.long(), rows[order]) and torch.equal(vals16, vals[order])
        segment_sum_into(out, 0, m, bags16, vals16, table, ptr16, 7, accumulate=i > 0)
        latent_sums_(gb, vals16, ptr16)
        ref_out.index_add_(0, cols.long(), vals[:, None] * table[rows])
    # one pass over each latent's entries, the first set's then the second's
    cat_cols = torch.cat([s[0] for s in sets]).long()
    cat_vals = torch.cat([s[1] for s in sets])
    ref_gb.index_add_(0, cat_cols, cat_vals)
    assert torch.equal(gb, ref_gb)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
