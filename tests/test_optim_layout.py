"""The batched-layout declaration of kernel manifolds selects the optimizer's fused updates.

A manifold's ``batched_layout`` declares which fused update computes its maths; a subclass that
overrides a batched primitive without declaring again must be updated by the generic path
with its own maths (an overridden projection is never bypassed by the fused sphere kernels).
"""

from __future__ import annotations

import pytest
import torch

from kernelgeo._compat import geoopt
from kernelgeo.manifolds import (
    BATCHED_LAYOUTS,
    CenteredSphere,
    Euclidean,
    KernelProduct,
    Oblique,
    Sphere,
    Stiefel,
)
from kernelgeo.optim import ConvergentRSGD, native
from kernelgeo.optim import batched as bt


class _CountingSphere(Sphere):
    """The sphere's maths, with the projection overridden (and counted), no declaration."""

    calls = 0

    def _bproju(self, x, u, r):
        type(self).calls += 1
        return super()._bproju(x, u, r)


class _DeclaredSphere(_CountingSphere):
    """The same override, declared: the subclass vouches that its maths is the sphere's."""

    batched_layout = "rows"


class _CentringSphere(Sphere):
    """A projection that differs from the sphere's: the gradient is centred first (without
    declaring it, so the fused kernels would silently drop the centring)."""

    def _bproju(self, x, u, r):
        u = u - u.mean(-1, keepdim=True)
        return u - ((x * u).sum(-1, keepdim=True) / (r * r)) * x


def test_shipped_declarations():
    assert BATCHED_LAYOUTS == ("rows", "columns", "matrices")
    cases = [(Sphere(), "rows", False), (CenteredSphere(), "rows", True),
             (Oblique(), "columns", False), (Oblique(per="slice"), "rows", False),
             (Stiefel(), "matrices", False), (Stiefel(retraction="polar"), "matrices", False),
             (Euclidean(), None, False)]
    for m, layout, centred in cases:
        assert m.batched_layout == layout and m.effective_batched_layout() == layout
        assert m.batched_centered is centred
    kinds = [bt._kind(m) for m, _, _ in cases]
    assert kinds == ["sphere", "sphere", "sphere", "sphere", "stiefel", "generic", "generic"]


def test_override_without_declaration_is_generic():
    assert _CountingSphere().batched_layout == "rows"  # inherited, but not in effect
    assert _CountingSphere().effective_batched_layout() is None
    assert bt._kind(_CountingSphere()) == "generic"
    assert _DeclaredSphere().effective_batched_layout() == "rows"
    assert bt._kind(_DeclaredSphere()) == "sphere"


def test_replacing_a_primitive_on_the_class_is_generic(monkeypatch):
    m = Sphere()
    assert bt._kind(m) == "sphere"
    orig = Sphere._bretr
    monkeypatch.setattr(Sphere, "_bretr", lambda self, x, u, r: orig(self, x, u, r))
    assert m.effective_batched_layout() is None and bt._kind(m) == "generic"


def test_invalid_declaration_is_refused():
    class Bad(Sphere):
        batched_layout = "diagonal"

    with pytest.raises(ValueError, match="batched_layout='diagonal'"):
        Bad().effective_batched_layout()


def _sgd(m, shape, backend, gen, steps=3, **kw):
    p = geoopt.ManifoldParameter(m.random(shape, dtype=torch.float64, generator=gen),
                                 manifold=m)
    opt = ConvergentRSGD([p], lr=0.3, momentum=0.9, backend=backend, **kw)
    for _ in range(steps):
        p.grad = torch.randn(shape, dtype=torch.float64, generator=gen)
        opt.step()
    return p, opt


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_overriding_subclass_takes_the_generic_path(backend):
    """The fused sphere path (torch ops or C kernels) does not run for an undeclared override:
    its projection is called, and the iterates are those of its own maths (the reference
    path, the oracle)."""
    shape = (6, 3, 3, 3)
    _CountingSphere.calls = 0
    p, opt = _sgd(_CountingSphere(), shape, backend, torch.Generator().manual_seed(0))
    assert _CountingSphere.calls >= 3
    assert all(ch.kind == "generic" for gp in opt._plan for ch in gp.chunks)
    assert not any(gp.native for gp in opt._plan)

    m = _CentringSphere()
    fast, _ = _sgd(m, shape, backend, torch.Generator().manual_seed(1))
    ref, _ = _sgd(m, shape, backend, torch.Generator().manual_seed(1), batched=False)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    # the sphere's own maths (the fused path) would not centre the gradient: different iterates
    sph, _ = _sgd(Sphere(), shape, backend, torch.Generator().manual_seed(1))
    assert (sph - fast).abs().max() > 1e-3


def test_declared_subclass_takes_the_fused_path():
    shape = (6, 3, 3, 3)
    _DeclaredSphere.calls = 0
    p, opt = _sgd(_DeclaredSphere(), shape, "torch", torch.Generator().manual_seed(0))
    assert [ch.kind for gp in opt._plan for ch in gp.chunks] == ["sphere"]
    assert _DeclaredSphere.calls == 0  # the closed form of the fused update instead
    if native.available():
        _, opt = _sgd(_DeclaredSphere(), shape, "native", torch.Generator().manual_seed(0))
        assert sum(len(gp.native) for gp in opt._plan) == 1


def test_product_blocks_follow_their_own_declaration():
    m = KernelProduct([Sphere(), _CountingSphere()], partition="out")
    _, opt = _sgd(m, (8, 3, 3, 3), "torch", torch.Generator().manual_seed(2))
    assert sorted(ch.kind for gp in opt._plan for ch in gp.chunks) == ["generic", "sphere"]


# ------------------------------------------------------------ step-rule table and C interface
def test_rule_codes_come_from_the_table():
    from kernelgeo.optim.step_rules import (
        DEFAULT_MAX_STEP,
        KERNEL_CAPPED,
        KERNEL_UNCAPPED,
        RULES,
        STEP_RULES,
        rule_constants,
    )

    assert RULES == tuple(STEP_RULES) == ("gsgd", "bounded", "none")
    assert KERNEL_CAPPED != KERNEL_UNCAPPED
    shape = (4, 3, 3, 3)
    for rule in RULES:
        c = rule_constants(rule, Sphere(), shape)
        capped = STEP_RULES[rule].radius is not None
        assert c.code == (KERNEL_CAPPED if capped else KERNEL_UNCAPPED)
        assert c.kernel_cap == (c.cap if capped else 1.0)
    # gsgd on a unit sphere: theta * pi / 2 (the convexity-radius bound), independently
    c = rule_constants("gsgd", Sphere(), shape)
    assert c.cap == pytest.approx(DEFAULT_MAX_STEP * torch.pi / 2, rel=1e-15)
    flat = rule_constants("gsgd", Euclidean(), shape)
    assert flat.code == KERNEL_UNCAPPED and flat.kernel_cap == 1.0


def test_c_header_is_generated_from_the_definitions():
    from kernelgeo.optim.step_rules import KERNEL_CAPPED, KERNEL_UNCAPPED

    h = native.c_header()
    assert f"#define KG_RULE_CAPPED {KERNEL_CAPPED} " in h
    assert f"#define KG_RULE_UNCAPPED {KERNEL_UNCAPPED} " in h
    body = h[h.index("typedef struct {"):h.index("} kg_item;")]
    names = [ln.split("/*")[0].strip().rstrip(";").split()[-1].lstrip("*")
             for ln in body.splitlines()[1:]]
    assert names == [f[0] for f in native.ITEM_FIELDS] == [f[0] for f in native.Item._fields_]


@pytest.mark.skipif(not native.available(), reason="no native kernels")
def test_library_reports_the_structure_it_was_built_with(tmp_path, monkeypatch):
    """The loaded library's kg_item agrees with the ctypes structure; a library built from
    another definition (fields swapped) is refused before any step could use it."""
    import ctypes

    native.check_abi(native.load())

    class Swapped(ctypes.Structure):
        _fields_ = [(n, t) for n, t in native.Item._fields_]
        _fields_[5], _fields_[8] = _fields_[8], _fields_[5]

    with pytest.raises(native.AbiMismatchError, match="kg_item layout"):
        native.check_abi(native.load(), Swapped)
    # a stale library: compiled from a header whose struct has two fields swapped
    good = native.c_header()
    bad = good.replace("    int64_t nblk;", "    int64_t TMP;").replace(
        "    int32_t center;", "    int64_t nblk;").replace("    int64_t TMP;",
                                                            "    int32_t center;")
    assert bad != good
    monkeypatch.setattr(native, "c_header", lambda: bad)
    out = tmp_path / "stale.so"
    native._build(native._compiler(), ["-O0", "-std=c11", "-fPIC", "-shared"], out)
    lib = ctypes.CDLL(str(out))
    lib.kg_abi.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    lib.kg_abi.restype = ctypes.c_int64
    with pytest.raises(native.AbiMismatchError):
        native.check_abi(lib)
    with pytest.raises(native.AbiMismatchError):
        native._bind(lib)


def test_momentum_state_is_written_in_one_module():
    """Only kernelgeo.optim.momentum binds tensors into state[p]["momentum_*"] (the Triton
    backend, maintained separately, publishes its own new buffers in the same format)."""
    import re
    from pathlib import Path

    import kernelgeo.optim as pkg

    root = Path(pkg.__file__).parent
    write = re.compile(r"""\[\s*["']momentum_(blocks|buffer)["']\s*\]\s*=(?!=)|"""
                       r"""setdefault\(\s*["']momentum_|blocks\[[^\]]+\]\s*=(?!=)|"""
                       r"""\bbl\[[^\]]+\]\s*=(?!=)""")
    offenders = []
    for f in sorted(root.rglob("*.py")):
        if f.name in ("momentum.py", "adam.py"):  # adam.py keeps its own state
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if write.search(line.split("#")[0]):
                offenders.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert offenders == []


# the subprocess imports this module's classes: Triton's interpreter must be switched on
# before triton is first imported, which this process may already have done
_TRITON_SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from kernelgeo._compat import geoopt
from kernelgeo.optim import ConvergentRSGD, triton_backend as tb
if not tb.available():
    print("SKIP"); sys.exit(0)
sys.path.insert(0, "tests")
from test_optim_layout import _CountingSphere, _DeclaredSphere

out = []
for name, cls in (("Overriding", _CountingSphere), ("Declared", _DeclaredSphere)):
    cls.calls = 0
    gen = torch.Generator().manual_seed(0)
    m = cls()
    p = geoopt.ManifoldParameter(m.random((6, 3, 3, 3), generator=gen), manifold=m)
    opt = ConvergentRSGD([p], lr=0.1, momentum=0.9, backend="triton")
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    items = sum(len(dp.items) for dp in opt._plan.devices.values())
    out.append(f"{name}:{items}:{cls.calls > 0}")
print(" ".join(out))
"""


def test_triton_backend_follows_the_declaration():
    """The Triton backend's sphere kernels (run in Triton's interpreter) take a declared
    subclass, and leave an undeclared override to the generic torch path."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], capture_output=True,
                         text=True, cwd=root, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    if last == "SKIP":
        pytest.skip("triton cannot be imported")
    assert last == "Overriding:0:True Declared:1:False"
