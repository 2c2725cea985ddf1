r"""Riemannian logarithm and geodesic distance on :math:`\mathrm{St}(n,p)`, both metrics.

One implementation, used by :class:`~kernelgeo.manifolds.Stiefel` (``logmap``,
``component_dist``) and by :mod:`kernelgeo.analysis.geodesics`.  Unit radius here; the
callers scale by :math:`r`.  Everything runs in float64.

Reduction.  A geodesic from :math:`Y_0` with velocity :math:`U` stays in the column span of
:math:`[Y_0, U]`, so the minimising geodesic to :math:`Y_1` lies in a subspace of dimension
:math:`k = \min(n, 2p)` that contains the columns of :math:`Y_0` and :math:`Y_1`; all such
subspaces are related by isometries fixing :math:`Y_0, Y_1`.  With
:math:`W = [Y_0\ Q]` an orthonormal basis of one of them (Householder QR of
:math:`[Y_0,\ Y_1 - Y_0Y_0^\top Y_1]`, whose :math:`Q` is orthogonal to :math:`Y_0` even when
the second block is rank-deficient) the problem becomes one on :math:`\mathrm{St}(k,p)` at
:math:`E = [I_p; 0]`, with tangent vectors :math:`[A; B]`, :math:`A` skew.

Exponentials of the one-parameter family of metrics (Hüper, Markina & Silva Leite 2021;
:math:`\beta=\tfrac12` canonical, :math:`\beta=1` embedded/Euclidean):

.. math::

    \mathrm{Exp}^\beta_E([A;B]) = \exp\!\begin{pmatrix}2\beta A & -B^\top\\ B & 0\end{pmatrix}
    \begin{pmatrix}I\\0\end{pmatrix} e^{(1-2\beta)A}.

Logarithm.

* :math:`n = p` (:math:`O(p)`): both metrics have the geodesics :math:`Y_0e^{t\Omega}`;
  :math:`\Omega` is the principal real logarithm of :math:`Y_0^\top Y_1` from its real Schur
  form (closed form).  Points with :math:`\det Y_0^\top Y_1 < 0` lie in different components:
  no curve joins them (:class:`StiefelLogError`; the distance is :math:`+\infty`).
* :math:`n > p`, canonical metric: Zimmermann's algorithm (2017) on the reduced problem, with
  the full orthogonal completion, then Gauss–Newton polishing.
* :math:`n > p`, embedded metric: from the canonical logarithm, single-shooting steps while
  they contract by half, then Gauss–Newton on :math:`\mathrm{Exp}^1_E([A;B]) = \hat Y_1`
  with the exact differential of the matrix exponential (forward-mode autodiff of
  ``torch.linalg.matrix_exp``, i.e. its Fréchet derivative), dense least squares for small
  problems and CGLS for large ones, backtracking on the residual.  If it stalls, numerical
  continuation along the curve :math:`\tau\mapsto e^{\tau L}E` (:math:`e^L` an
  :math:`SO(k)` completion of :math:`\hat Y_1`), a Gauss–Newton correction per step.

Every result is verified: :math:`\|\mathrm{Exp}_{Y_0}(\Delta) - Y_1\|_F\le` ``tol`` with the
exponential of the metric evaluated in the original :math:`n\times p` coordinates, and its
length must not exceed the radius within which a geodesic is certainly minimising
(:math:`\pi` for the embedded metric, Zimmermann & Stoye 2024; :math:`\sqrt{4/5}\,\pi` for the
canonical one if :math:`p\ge 2`, Rentmeesters 2013).  Otherwise :class:`StiefelLogError`
says why; no other metric or surrogate is substituted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["StiefelLogError", "stiefel_log_unit", "stiefel_dist_unit", "exp_beta",
           "real_log_orthogonal", "CERTIFIED_RADIUS"]

#: radius (unit Stiefel manifold, n > p >= 2) below which a geodesic is certainly minimising
#: (for p = 1 both metrics are the sphere's: pi)
CERTIFIED_RADIUS = {"euclidean": math.pi, "canonical": math.sqrt(0.8) * math.pi}
_BETA = {"euclidean": 1.0, "canonical": 0.5}


class StiefelLogError(RuntimeError):
    """The Stiefel logarithm or distance cannot be computed reliably (the reason is given)."""


# ------------------------------------------------------------------------- O(k) logarithm
def real_log_orthogonal(v: np.ndarray) -> np.ndarray:
    r"""Real skew logarithm :math:`L` of :math:`V\in SO(k)` with :math:`e^L = V`.

    From the real Schur form :math:`V = ZTZ^\top` (:math:`T` block diagonal with rotation
    blocks): each block's angle by ``atan2`` (principal, in :math:`(-\pi,\pi]`); eigenvalues
    :math:`-1` (an even number in :math:`SO(k)`) are paired into rotations by :math:`\pi`.
    Raises :class:`StiefelLogError` when :math:`\det V < 0`.
    """
    from scipy.linalg import schur

    k = v.shape[0]
    t, z = schur(v, output="real")
    lt = np.zeros_like(t)
    minus = []
    i = 0
    while i < k:
        if i + 1 < k and abs(t[i + 1, i]) > 1e-300:
            c = 0.5 * (t[i, i] + t[i + 1, i + 1])
            s = 0.5 * (t[i + 1, i] - t[i, i + 1])
            th = math.atan2(s, c)
            lt[i + 1, i], lt[i, i + 1] = th, -th
            i += 2
        else:
            if t[i, i] < 0:
                minus.append(i)
            i += 1
    if len(minus) % 2:
        raise StiefelLogError("the matrix has determinant -1: it has no real logarithm "
                              "(the two points lie in different components of O(p))")
    for a, b in zip(minus[0::2], minus[1::2]):
        lt[b, a], lt[a, b] = math.pi, -math.pi
    out = z @ lt @ z.T
    return 0.5 * (out - out.T)


# ------------------------------------------------------------------- reduced exponentials
def _split(x: torch.Tensor, p: int, k: int):
    """Unknown vector -> (A skew p x p, B (k-p) x p)."""
    iu = torch.triu_indices(p, p, 1)
    na = iu.shape[1]
    a = torch.zeros(p, p, dtype=x.dtype)
    a = a.index_put((iu[0], iu[1]), x[:na])
    a = a - a.T
    b = x[na:].reshape(k - p, p)
    return a, b


def _join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    p = a.shape[0]
    iu = torch.triu_indices(p, p, 1)
    return torch.cat([a[iu[0], iu[1]], b.reshape(-1)])


def exp_beta(a: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
    r""":math:`\mathrm{Exp}^\beta_E([A;B])` on :math:`\mathrm{St}(k,p)`, shape ``(k, p)``."""
    p = a.shape[-1]
    kp = b.shape[-2]
    z = torch.zeros(kp, kp, dtype=a.dtype)
    blk = torch.cat([torch.cat([2 * beta * a, -b.T], 1), torch.cat([b, z], 1)], 0)
    e = torch.linalg.matrix_exp(blk)[:, :p]
    if beta == 0.5:
        return e
    return e @ torch.linalg.matrix_exp((1 - 2 * beta) * a)


# ------------------------------------------------------------------------ Gauss-Newton
def _cgls(jv, jtv, rhs, maxit, tol):
    """Least squares min |J d - rhs| by CGLS (matrix-free)."""
    x = None
    r = rhs.clone()
    s = jtv(r)
    p_ = s.clone()
    gamma = float(s @ s)
    g0 = gamma
    x = torch.zeros_like(s)
    for _ in range(maxit):
        q = jv(p_)
        qq = float(q @ q)
        if qq == 0.0:
            break
        alpha = gamma / qq
        x = x + alpha * p_
        r = r - alpha * q
        s = jtv(r)
        gnew = float(s @ s)
        if gnew <= tol * tol * g0:
            break
        p_ = s + (gnew / gamma) * p_
        gamma = gnew
    return x


def _shoot(x0, target, p, k, beta, tol, max_iter=60):
    """Cheap start: U <- U + P_E(target - Exp(U)) while it contracts fast (dExp ~ id)."""
    x = x0.clone()
    a, b = _split(x, p, k)
    res_m = target - exp_beta(a, b, beta)
    res = float(res_m.norm())
    its = 0
    for _ in range(max_iter):
        if res <= tol:
            break
        ra = res_m[:p]
        xn = x + _join(0.5 * (ra - ra.T), res_m[p:])
        a, b = _split(xn, p, k)
        rn_m = target - exp_beta(a, b, beta)
        rn = float(rn_m.norm())
        if rn > 0.5 * res:  # slow or diverging: leave it to Gauss-Newton
            if rn < res:
                x, res, its = xn, rn, its + 1
            break
        x, res_m, res = xn, rn_m, rn
        its += 1
    return x, its


def _gauss_newton(x0, target, p, k, beta, tol, max_iter, dense_limit=400):
    """Solve Exp^beta_E(x) = target; returns (x, residual, iterations)."""
    t = target.reshape(-1)

    def fun(x):
        a, b = _split(x, p, k)
        return exp_beta(a, b, beta).reshape(-1)

    x = x0.clone()
    f = fun(x) - t
    res = float(f.norm())
    nvar = x.numel()
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        if res <= tol:
            return x, res, it - 1
        if nvar <= dense_limit:
            jac = torch.func.jacfwd(fun)(x)
            d = torch.linalg.lstsq(jac, -f.unsqueeze(1), driver="gelsd").solution[:, 0]
        else:
            def jv(v, x=x):
                return torch.func.jvp(fun, (x,), (v,))[1]

            _, vjp_fn = torch.func.vjp(fun, x)

            def jtv(w, vjp_fn=vjp_fn):
                return vjp_fn(w)[0]

            d = _cgls(jv, jtv, -f, maxit=200, tol=1e-3 * min(1.0, res))
        step = 1.0
        while step > 1e-4:
            xn = x + step * d
            fn = fun(xn) - t
            rn = float(fn.norm())
            if rn < res:
                break
            step *= 0.5
        else:
            return x, res, it
        x, f, res = xn, fn, rn
    return x, res, it


# --------------------------------------------------------------------- per-pair solvers
def _frame(y0: np.ndarray, y1: np.ndarray):
    """Orthonormal W = [Y0, Q] (n x k) with the columns of Y1 in its span; Y1 in W coords."""
    n, p = y0.shape
    k = min(n, 2 * p)
    z = y1 - y0 @ (y0.T @ y1)
    w, _ = np.linalg.qr(np.hstack([y0, z]))
    w = w[:, :k]
    w[:, :p] = y0  # Householder returns +-Y0 there; keep Y0 itself (same span)
    return w, w.T @ y1


def _so_completion(yh: np.ndarray) -> np.ndarray:
    """[Yh, X] in SO(k) (k > p)."""
    k, p = yh.shape
    full, _ = np.linalg.qr(yh, mode="complete")
    v = np.hstack([yh, full[:, p:]])
    if np.linalg.det(v) < 0:
        v[:, -1] *= -1
    return v


def _zimmermann(yh: np.ndarray, tol: float, max_iter: int):
    """Canonical log on St(k, p) at E: (A, B) or None when it does not converge."""
    k, p = yh.shape
    v = _so_completion(yh)
    from scipy.linalg import expm

    for _ in range(max_iter):
        lv = real_log_orthogonal(v)
        c = lv[p:, p:]
        if np.linalg.norm(c) < tol:
            return lv[:p, :p], lv[p:, :p]
        v[:, p:] = v[:, p:] @ expm(-c)
    return None


def _continuation(yh_t: torch.Tensor, beta: float, tol: float, max_steps: int = 400):
    """Track the beta-log along tau -> exp(tau L)[:, :p] from tau = 0 to 1."""
    k, p = yh_t.shape
    ll = torch.from_numpy(real_log_orthogonal(_so_completion(yh_t.numpy())))
    x = torch.zeros(p * (p - 1) // 2 + (k - p) * p, dtype=torch.float64)
    x_prev = None
    tau, h, h_prev, steps = 0.0, 0.1, 1.0, 0
    while tau < 1.0 and steps < max_steps:
        steps += 1
        tn = min(1.0, tau + h)
        target = torch.linalg.matrix_exp(tn * ll)[:, :p]
        guess = x if x_prev is None else x + (x - x_prev) * (tn - tau) / h_prev
        xn, res, _ = _gauss_newton(guess, target, p, k, beta, 0.1 * tol, 12)
        if res <= 0.1 * tol or (tn < 1.0 and res <= 1e-6):
            x_prev, x, h_prev, tau = x, xn, tn - tau, tn
            h = min(0.25, 1.5 * h)
        else:
            h *= 0.5
            if h < 1e-5:
                return None
    return x if tau >= 1.0 else None


def _log_pair(y0: np.ndarray, y1: np.ndarray, metric: str, tol: float, max_iter: int):
    """Unit-radius log (n x p) of one pair, verified in the reduced coordinates."""
    n, p = y0.shape
    beta = _BETA[metric]
    if n == p:
        m = y0.T @ y1
        if np.linalg.det(m) < 0:
            raise StiefelLogError(
                "the two points lie in different components of O(p) (det(X^T Y) < 0): no "
                "curve joins them and their distance is infinite")
        return y0 @ real_log_orthogonal(m), "closed form (principal log, O(p))"
    w, yh = _frame(y0, y1)
    k = w.shape[1]
    yh_t = torch.from_numpy(np.ascontiguousarray(yh))
    start = _zimmermann(yh, 0.1 * tol, max_iter)
    method = "Zimmermann"
    if start is not None:
        x0 = _join(torch.from_numpy(start[0]), torch.from_numpy(start[1]))
        x0, n_shoot = _shoot(x0, yh_t, p, k, beta, 0.1 * tol)
        x, res, n_gn = _gauss_newton(x0, yh_t, p, k, beta, 0.1 * tol, max_iter)
        method = (f"Zimmermann start, {n_shoot} shooting and {n_gn} Gauss-Newton steps")
    else:
        x, res = None, math.inf
    if res > 0.1 * tol:
        x = _continuation(yh_t, beta, tol)
        method = "continuation"
        if x is None:
            raise StiefelLogError(
                f"{metric} Stiefel log on St({n},{p}): neither Zimmermann/Gauss-Newton nor "
                "continuation reached the endpoint")
    a, b = _split(x, p, k)
    return (w @ np.vstack([a.numpy(), b.numpy()])), method


def _exp_full(y0: torch.Tensor, u: torch.Tensor, metric: str) -> torch.Tensor:
    """Exponential in the original coordinates (independent of the reduction)."""
    p = y0.shape[-1]
    a = y0.T @ u
    if metric == "euclidean":  # Edelman, Arias & Smith 1998, eq. 2.45
        s = u.T @ u
        eye = torch.eye(p, dtype=u.dtype)
        e = torch.linalg.matrix_exp(torch.cat([torch.cat([a, -s], 1), torch.cat([eye, a], 1)]))
        return torch.cat([y0, u], 1) @ e[:, :p] @ torch.linalg.matrix_exp(-a)
    if y0.shape[0] == p:
        return y0 @ torch.linalg.matrix_exp(a)
    q, b = torch.linalg.qr(u - y0 @ a)  # Edelman et al. eq. 2.42
    z = torch.zeros_like(a)
    blk = torch.cat([torch.cat([a, -b.T], 1), torch.cat([b, z], 1)])
    return torch.cat([y0, q], 1) @ torch.linalg.matrix_exp(blk)[:, :p]


def metric_norm(y0: torch.Tensor, u: torch.Tensor, metric: str) -> torch.Tensor:
    r"""Norm of tangent vectors ``(G, n, p)``: :math:`\|U\|` or
    :math:`\sqrt{\|U\|^2 - \tfrac12\|Y^\top U\|^2}` (canonical)."""
    nrm2 = (u * u).flatten(1).sum(1)
    if metric == "canonical":
        a = y0.transpose(-1, -2) @ u
        nrm2 = nrm2 - 0.5 * (a * a).flatten(1).sum(1)
    return nrm2.clamp_min(0).sqrt()


def stiefel_log_unit(y0: torch.Tensor, y1: torch.Tensor, *, metric: str = "euclidean",
                     tol: float = 1e-9, max_iter: int = 100, certify: bool = True,
                     return_info: bool = False):
    r"""Logarithm on the unit :math:`\mathrm{St}(n,p)`, batched ``(G, n, p)`` float64.

    Parameters
    ----------
    y0, y1 : torch.Tensor
        Points (orthonormal columns to round-off), ``(G, n, p)``.
    metric : {"euclidean", "canonical"}
    tol : float
        Bound on the endpoint error :math:`\|\mathrm{Exp}_{Y_0}(\Delta) - Y_1\|_F` checked on
        every result.
    max_iter : int
        Iteration cap of Zimmermann's algorithm and of Gauss–Newton.
    certify : bool
        For :math:`n > p`, refuse logarithms longer than the radius within which geodesics
        are certainly minimising (:data:`CERTIFIED_RADIUS`).  With ``False`` a verified
        geodesic of any length is returned (its length is then only an upper bound of the
        distance).

    Raises
    ------
    StiefelLogError
        Different components of :math:`O(p)`, no convergence, endpoint error above ``tol``,
        or (``certify``) a geodesic longer than the certified radius.
    """
    if metric not in _BETA:
        raise ValueError(f"metric must be 'euclidean' or 'canonical', got {metric!r}")
    g, n, p = y0.shape
    outs, methods = [], []
    for i, (a, b) in enumerate(zip(y0.numpy(), y1.numpy())):
        try:
            u, how = _log_pair(a, b, metric, tol, max_iter)
        except StiefelLogError as err:
            raise StiefelLogError(f"component {i} of {g}: {err}") from None
        outs.append(u)
        methods.append(how)
    u = torch.from_numpy(np.stack(outs))
    # verification in the original coordinates with the metric's own exponential
    err = torch.stack([(_exp_full(a, b, metric) - c).norm() for a, b, c in zip(y0, u, y1)])
    bad = int(torch.argmax(err))
    if float(err[bad]) > tol:
        raise StiefelLogError(
            f"{metric} Stiefel log on St({n},{p}), component {bad} of {g}: endpoint error "
            f"|Exp(log) - Y| = {float(err[bad]):.3g} > tol = {tol:.3g} ({methods[bad]})")
    nrm = metric_norm(y0, u, metric)
    if certify and n > p:
        # p = 1: both metrics are the round sphere's (Y^T U = 0), injectivity radius pi
        lim = CERTIFIED_RADIUS["euclidean" if p == 1 else metric]
        over = nrm > lim * (1 + 1e-9)
        if bool(over.any()):
            j = int(torch.nonzero(over)[0])
            raise StiefelLogError(
                f"{metric} Stiefel log on St({n},{p}), component {j} of {g}: the geodesic "
                f"found has length {float(nrm[j]):.6g} > {lim:.6g} (unit radius), beyond the "
                "radius within which geodesics are certainly minimising; its length is only "
                "an upper bound of the distance")
    info = {"residual": float(err.max()), "methods": methods, "lengths": nrm}
    return (u, info) if return_info else u


def stiefel_dist_unit(y0: torch.Tensor, y1: torch.Tensor, *, metric: str = "euclidean",
                      **kwargs) -> torch.Tensor:
    r"""Geodesic distance on the unit :math:`\mathrm{St}(n,p)`, ``(G,)``, float64.

    :math:`O(p)` (:math:`n=p`): closed form :math:`\sqrt{c\sum_j\theta_j^2}` over the
    eigen-angles :math:`\theta_j\in[0,\pi]` of :math:`Y_0^\top Y_1` (:math:`c = 1` embedded,
    :math:`\tfrac12` canonical), and :math:`+\infty` between different components.
    :math:`n>p`: the norm of the verified, certified logarithm (:func:`stiefel_log_unit`).
    """
    g, n, p = y0.shape
    if n == p:
        m = y0.transpose(-1, -2) @ y1
        ang = torch.angle(torch.linalg.eigvals(m))
        d2 = (ang * ang).sum(-1)
        if metric == "canonical":
            d2 = 0.5 * d2
        d = d2.sqrt()
        return torch.where(torch.linalg.det(m) < 0, math.inf, d)
    u = stiefel_log_unit(y0, y1, metric=metric, **kwargs)
    return metric_norm(y0, u, metric)
