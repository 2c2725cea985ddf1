"""The fused CPU kernels of ``kernelgeo.optim.native``: same iterates as the torch path.

Every kernel variant is reached: long rows (spheres), the vectorised 3-entry columns of 3x3
oblique kernels (stored contiguously, as ``constrain`` does, or with the last two dimensions
swapped, as the manifold's projection returns them), short components of any length and
stride, long strided columns, and the double-precision rescaled fallback for sums that
overflow.  Skipped when no C compiler is available.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
import torch

from kernelgeo._compat import geoopt
from kernelgeo.manifolds import get_manifold
from kernelgeo.optim import ConvergentRSGD, NonFiniteGradientError, native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"no native kernels: {native.unavailable_reason()}")

CONFIGS = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
           dict(momentum=0.5, dampening=0.3)]
#: (manifold, kernel shape, layout) covering every C kernel: rows (long rows), short3 (3-entry
#: contiguous columns), short_any (short components, any stride), cols (long strided columns)
CASES = [
    ("sphere", (8, 4, 3, 3), "contiguous"),           # rows, n = 36
    ("sphere", (6, 2, 2, 2), "contiguous"),           # short_any, n = 8
    ("sphere", (8, 4, 3, 3), "channels_last"),        # rows, inner order permuted
    ("centered-sphere", (8, 4, 3, 3), "contiguous"),  # rows with centring
    ("centered-sphere", (5, 1, 2, 2), "contiguous"),  # short_any with centring
    ("oblique", (8, 4, 3, 3), "manifold"),            # short3 rows: columns contiguous
    ("oblique", (8, 4, 3, 3), "contiguous"),          # short3 slices: a = 3, s = 3
    ("oblique", (100, 3, 3, 3), "contiguous"),        # short3 slices: several chunks
    ("oblique", (4, 3, 5, 5), "contiguous"),          # short_any: a = 5, s = 5
    ("oblique", (3, 2, 20, 3), "contiguous"),         # cols: a = 20 > 16, s = 3
    ("oblique", (3, 2, 20, 3), "manifold"),           # rows: a = 20 columns contiguous
    ("oblique", (4, 3, 7), "contiguous"),             # Conv1d: columns are the rows
    ("oblique-slice", (8, 4, 3, 3), "contiguous"),    # short_any, a = 9
]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t  # as the manifold's projection/sampling stores it


def _pair(spec, shape, layout, dtype, gen, n=2):
    m = get_manifold(spec)
    ps = [geoopt.ManifoldParameter(_layout(m.random(shape, dtype=dtype, generator=gen), layout),
                                   manifold=m) for _ in range(n)]
    ps.append(torch.nn.Parameter(torch.randn(5, dtype=dtype, generator=gen)))
    qs = [geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold)
          if hasattr(p, "manifold") else torch.nn.Parameter(p.detach().clone()) for p in ps]
    return m, ps, qs


def _feed(ps, qs, gen, scale=1.0):
    for p, q in zip(ps, qs, strict=True):
        g = torch.randn(p.shape, dtype=p.dtype, generator=gen) * scale
        # like AccumulateGrad: the gradient has the parameter's strides
        p.grad = torch.empty_like(p.detach()).copy_(g)
        q.grad = torch.empty_like(q.detach()).copy_(g)


def _n_native(opt) -> int:
    return sum(len(gp.native) for gp in opt._plan)


def _compare(opt_a, opt_b, ps, qs, tol):
    for p, q in zip(ps, qs, strict=True):
        assert (p.detach() - q.detach()).abs().max() <= tol
        sa, sb = opt_a.state[p], opt_b.state[q]
        for key in ("momentum_blocks",):
            for a, b in zip(sa.get(key, []), sb.get(key, []), strict=True):
                assert (a - b).abs().max() <= 10 * tol


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}")
@pytest.mark.parametrize("rule", ["gsgd", "bounded", "none"])
def test_native_matches_torch_path(case, rule, dtype, gen):
    spec, shape, layout = case
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for cfg in CONFIGS:
        m, ps, qs = _pair(spec, shape, layout, dtype, gen)
        a = ConvergentRSGD(ps, lr=0.3, step_rule=rule, native=True, **cfg)
        b = ConvergentRSGD(qs, lr=0.3, step_rule=rule, native=False, **cfg)
        for _ in range(4):
            _feed(ps, qs, gen)
            a.step()
            b.step()
        assert _n_native(a) == 2 and _n_native(b) == 0
        _compare(a, b, ps, qs, tol)
        for p in ps[:-1]:
            assert m.constraint_error(p) < (1e-12 if dtype == torch.float64 else 2e-6)


def test_reference_path_agrees_on_a_conv_net(gen):
    """A small CNN constrained per layer (the layouts ``constrain`` produces): native, torch
    and per-parameter reference paths give the same weights and buffers."""
    import kernelgeo

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1), torch.nn.Flatten(),
                              torch.nn.LazyLinear(2)).double()
    net(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    kernelgeo.constrain(net, {"0": "oblique", "2": "sphere", "4": "centered-sphere"})
    nets = [net, copy.deepcopy(net), copy.deepcopy(net)]
    opts = [ConvergentRSGD(n.parameters(), lr=0.2, momentum=0.9, native=nat, batched=bat)
            for n, nat, bat in zip(nets, (True, False, False), (True, True, False),
                                   strict=True)]
    for _ in range(5):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=gen)
        for n, o in zip(nets, opts, strict=True):
            o.zero_grad()
            n(x).square().mean().backward()
            o.step()
    assert _n_native(opts[0]) == 3
    for a, b, c in zip(*(n.parameters() for n in nets), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [("sphere", (4, 3, 3, 3), "contiguous"),
                                  ("oblique", (4, 3, 3, 3), "manifold"),
                                  ("oblique", (4, 3, 3, 3), "contiguous"),
                                  ("oblique", (4, 3, 5, 5), "contiguous"),
                                  ("oblique", (3, 2, 20, 3), "contiguous")],
                         ids=["rows", "short3-rows", "short3-slices", "short_any", "cols"])
def test_overflowing_sums_fall_back_to_rescaled_double(case, dtype, gen):
    """Gradients near the largest float overflow the fast kernels' sums of squares; the
    rescaled double fallback still takes a finite step.  With ``bounded`` and a step longer
    than the cap, the step is the cap along the direction, whatever the gradient's scale:
    so it equals the reference path's step on the same gradient scaled down to 1e3."""
    spec, shape, layout = case
    big, small = (1e36 if dtype == torch.float32 else 1e300), 1e3
    m, ps, qs = _pair(spec, shape, layout, dtype, gen, n=1)
    a = ConvergentRSGD(ps, lr=0.5, step_rule="bounded", momentum=0.9, native=True)
    b = ConvergentRSGD(qs, lr=0.5, step_rule="bounded", momentum=0.9, native=False,
                       batched=False)
    _feed(ps, qs, gen)
    ps[0].grad.mul_(big)
    qs[0].grad.mul_(small)
    a.step()
    b.step()
    assert _n_native(a) == 1
    assert torch.isfinite(ps[0]).all()
    assert m.constraint_error(ps[0]) < (1e-12 if dtype == torch.float64 else 2e-6)
    tol = 1e-10 if dtype == torch.float64 else 5e-6
    assert (ps[0].detach() - qs[0].detach()).abs().max() <= tol
    buf = a.state[ps[0]]["momentum_blocks"][0] / big
    ref = b.state[qs[0]]["momentum_blocks"][0] / small
    assert torch.isfinite(buf).all()
    assert ((buf - ref).abs().max() / ref.abs().max()) <= tol


@pytest.mark.parametrize("where", ["kernel", "euclidean"])
def test_nonfinite_gradient_writes_nothing(where, gen):
    m, ps, qs = _pair("oblique", (4, 3, 3, 3), "manifold", torch.float32, gen)
    opt = ConvergentRSGD(ps, lr=0.3, momentum=0.9, native=True)
    _feed(ps, qs, gen)
    opt.step()
    before = [p.detach().clone() for p in ps]
    bufs = [b.clone() for p in ps[:-1] for b in opt.state[p]["momentum_blocks"]]
    _feed(ps, qs, gen)
    bad = ps[0] if where == "kernel" else ps[-1]
    bad.grad[(0,) * bad.dim()] = float("nan")
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    for p, b0 in zip(ps, before, strict=True):
        assert torch.equal(p.detach(), b0)
    after = [b for p in ps[:-1] for b in opt.state[p]["momentum_blocks"]]
    assert all(torch.equal(x, y) for x, y in zip(bufs, after, strict=True))


def test_stats_state_dict_and_version_counter(gen):
    m, ps, qs = _pair("sphere", (6, 4, 3, 3), "contiguous", torch.float64, gen)
    a = ConvergentRSGD(ps, lr=0.3, momentum=0.9, native=True, log_stats=True)
    b = ConvergentRSGD(qs, lr=0.3, momentum=0.9, native=False, log_stats=True)
    _feed(ps, qs, gen)
    v0 = ps[0]._version
    a.step()
    b.step()
    assert ps[0]._version > v0  # autograd sees the in-place update
    for k in ("R_max", "R_mean", "g_min", "g_mean", "step_max", "step_over_inj_max"):
        torch.testing.assert_close(a.last_stats[0][k], b.last_stats[0][k])
    # state_dict round trip mid-training continues identically
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    ps2 = [geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold)
           if hasattr(p, "manifold") else torch.nn.Parameter(p.detach().clone()) for p in ps]
    a2 = ConvergentRSGD(ps2, lr=0.3, momentum=0.9, native=True)
    buf.seek(0)
    a2.load_state_dict(torch.load(buf))
    for _ in range(3):
        _feed(ps, ps2, gen)
        a.step()
        a2.step()
    for p, q in zip(ps, ps2, strict=True):
        assert torch.equal(p.detach(), q.detach())


def test_native_option():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="native"):
        ConvergentRSGD([p], lr=0.1, native="yes")
    saved = native._tried, native._lib, native._error
    try:
        native._tried, native._lib, native._error = True, None, "no C compiler (test)"
        with pytest.raises(RuntimeError, match="no C compiler"):
            ConvergentRSGD([p], lr=0.1, native=True)
        ConvergentRSGD([p], lr=0.1)  # default: falls back silently
    finally:
        native._tried, native._lib, native._error = saved


def test_build_cache_and_disable(tmp_path):
    """A fresh cache directory gets one compiled library; KERNELGEO_NATIVE=0 disables."""
    code = ("from kernelgeo.optim import native; print(native.available(), "
            "native.unavailable_reason())")
    env = dict(os.environ, KERNELGEO_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split()[0] == "True", out.stderr
    libs = list(tmp_path.glob("native-*.so"))
    assert len(libs) == 1 and not list(tmp_path.glob("*.tmp*"))
    env["KERNELGEO_NATIVE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.startswith("False disabled")


@pytest.mark.parametrize("spec,native_blocks", [("po:sphere+stiefel", 1), ("po:2:oblique", 2),
                                                ("po:sphere+euclidean", 1), ("pi:2:sphere", 0),
                                                ("pio:2x2:sphere+oblique", 0)])
def test_product_blocks(spec, native_blocks, dtype, gen):
    """Dense blocks of products (ranges of output channels, PO) take the fused kernel in
    place, the other blocks the torch path, in the same step; the result equals the torch
    path's (and the constraint holds on every block)."""
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for cfg in CONFIGS:
        m, ps, qs = _pair(spec, (8, 4, 3, 3), "manifold", dtype, gen)
        a = ConvergentRSGD(ps, lr=0.3, native=True, **cfg)
        b = ConvergentRSGD(qs, lr=0.3, native=False, **cfg)
        for _ in range(3):
            _feed(ps, qs, gen)
            a.step()
            b.step()
        assert _n_native(a) == 2 * native_blocks
        _compare(a, b, ps, qs, tol)
        for p in ps[:-1]:
            assert m.constraint_error(p) < 10 * tol


def test_training_on_digits_matches_the_torch_path():
    """Real data (scikit-learn's digits): a small CNN with a sphere, an oblique and a
    centred-sphere layer trained for 40 steps in float32 follows the same loss curve with the
    fused kernels as with torch ops, and learns."""
    import kernelgeo
    from kernelgeo.data import load_digits

    d = load_digits()
    x = (d.x_train.float() / 255.0 - 0.3) / 0.35
    y = d.y_train

    def net():
        torch.manual_seed(0)
        n = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10))
        kernelgeo.constrain(n, {"0": "sphere", "3": "oblique", "6": "centered-sphere"})
        return n

    curves = []
    for fused in (True, False):
        n = net()
        opt = ConvergentRSGD(n.parameters(), lr=0.1, momentum=0.9, native=fused)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(40):
            idx = torch.randint(len(y), (64,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(n(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
        assert _n_native(opt) == (3 if fused else 0)
    torch.testing.assert_close(curves[0], curves[1], rtol=2e-3, atol=2e-3)
    assert curves[0][-10:].mean() < 0.5 * curves[0][:5].mean()


def test_a_build_failure_warns_and_falls_back(tmp_path):
    """A compiler that fails is reported once (RuntimeWarning) and the torch path is used."""
    fake = tmp_path / "badcc"
    fake.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = ("import warnings, torch\n"
            "from kernelgeo.optim import ConvergentRSGD, native\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.ones(2)\n"
            "    ConvergentRSGD([p], lr=0.5).step()\n"
            "print(native.available(), float(p[0]),\n"
            "      [str(x.message)[:40] for x in w if x.category is RuntimeWarning])\n")
    env = dict(os.environ, KERNELGEO_CACHE_DIR=str(tmp_path / "cache"), CC=str(fake))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False -0.5 ['kernelgeo: the fused CPU kernels did not")


def test_partition_covers_items_in_order():
    arr = (native.Item * 7)()
    for i, (it, n) in enumerate(zip(arr, [5, 1, 1, 9, 2, 2, 4], strict=True)):
        it.nblk, it.a, it.s, it.lr = n, 1, 1, float(i)
    for parts in (1, 2, 3, 7, 20):
        ps = native.partition(arr, parts)
        assert 1 <= len(ps) <= parts
        assert [it.lr for p in ps for it in p] == [float(i) for i in range(7)]
    arr[3].lr = 42.0  # the parts share the array's memory
    assert any(it.lr == 42.0 for p in native.partition(arr, 3) for it in p)


def test_threads_split_large_steps(monkeypatch, gen):
    """With several torch threads a large step is split over threads (kernels whole): the
    result is the single-threaded one, bit for bit."""
    import kernelgeo.optim.rsgd as rsgd_mod

    monkeypatch.setattr(rsgd_mod, "NATIVE_GRAIN", 64)
    n0 = torch.get_num_threads()
    m, ps, qs = _pair("oblique", (8, 4, 3, 3), "manifold", torch.float32, gen, n=6)
    grads = [[torch.randn(p.shape, generator=gen) for p in ps] for _ in range(3)]
    opts = []
    try:
        for threads, params in ((3, ps), (1, qs)):
            torch.set_num_threads(threads)
            opt = ConvergentRSGD(params, lr=0.3, momentum=0.9, native=True)
            for gs in grads:
                for p, g in zip(params, gs, strict=True):
                    p.grad = torch.empty_like(p.detach()).copy_(g)
                opt.step()
            opts.append(opt)
    finally:
        torch.set_num_threads(n0)
    assert [len(w[4]) for w in opts[0]._native_cache[1]] == [3]
    assert [len(w[4]) for w in opts[1]._native_cache[1]] == [1]
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p.detach(), q.detach())


def test_unwritable_cache_directory_falls_back_to_a_temporary_one(tmp_path):
    """A cache directory that cannot be created (here: below a regular file, which fails even
    for root) makes the library go to a per-user temporary directory instead."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    (tmp_path / "t").mkdir()
    code = "from kernelgeo.optim import native; print(native.available(), native.load()._name)"
    env = dict(os.environ, KERNELGEO_CACHE_DIR=str(blocker / "cache"), TMPDIR=str(tmp_path / "t"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.startswith("True " + str(tmp_path / "t" / "kernelgeo-")), \
        out.stdout + out.stderr


def test_the_one_time_compile_is_announced(tmp_path, capsys):
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path / "kg.so"
    native._build(cc, ["-O0", "-std=c11", "-fPIC", "-shared"], out)
    err = capsys.readouterr().err
    assert out.exists() and "compiling the fused CPU optimizer kernels" in err
    assert "once" in err and str(out) in err and "compiled in" in err
