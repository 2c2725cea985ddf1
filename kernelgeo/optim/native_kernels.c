/*
 * Fused Riemannian SGD steps of kernelgeo for sphere-like kernel layouts (CPU).
 *
 * Compiled on first use by kernelgeo/optim/native.py with the system C compiler and
 * loaded with ctypes; the Python fast path (kernelgeo/optim/geometries/sphere.py) is used
 * when no compiler is available.  The maths is that of
 * kernelgeo.optim.geometries.sphere.sphere_apply.
 *
 * Layout of one kernel ("item"): nblk blocks of a*s contiguous entries.  Component
 * (blk, j), j < s, is the vector of the a entries blk*a*s + k*s + j, k < a:
 *   - rows of a sphere / slice-oblique layout: s = 1, a = row length;
 *   - columns of the oblique manifold OB(a, s) of each kernel slice: a = k_h, s = k_w.
 * Each component lies on the sphere of radius r (centred: also zero mean).  Per component,
 * with mu = momentum, tau = dampening:
 *   u   = P_x(G) = G_c - <x, G_c>/r^2 x            (G_c = G, or G minus its mean)
 *   B   = u (first step) | mu B + (1 - tau) u       (then)
 *   d   = B | u + mu B (Nesterov) | u (no momentum)
 *   g_k = lambda / max(1, lambda ||d|| / cap)        (step rule: length <= cap)
 *   x'  = r y/||y||, y = x - g_k d                  (exact retraction)
 *   B'  = B - <x', B>/r^2 x' = B + c g_k <d, B>/r^2 x',  c = r/||y||
 * Kernels (chosen per item by kg_sphere_step):
 *   rows       s = 1, a > KG_SHORT (sphere rows): three passes per row over cached data;
 *   short3     a = 3, s = 1 or 3 (oblique columns of 3x3 kernels, stored with the last two
 *              dimensions swapped or contiguous): a branch-free loop over columns that the
 *              compiler vectorises;
 *   short_any  a <= KG_SHORT, any s: KG_W components at a time in local arrays;
 *   cols       a > KG_SHORT, s > 1: component by component, in double (comp_safe).
 * Sums use the data's precision with vector partial sums; a component whose sums overflow
 * (entries near the largest float) is recomputed in double with rescaling (comp_safe) before
 * anything of it is written.  Results equal the torch path's to rounding.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef KG_BODY
#define KG_BODY

#define KG_MAXS 64  /* longest slice row (k_w) handled by the column kernel */
#define KG_SHORT 16 /* components this short go to the vectorised short kernel */
#define KG_W 16     /* components per batch of the short kernel */

/* kg_item (one kernel of a step) and the step-rule codes KG_RULE_CAPPED / KG_RULE_UNCAPPED
 * come from kg_generated.h, which kernelgeo/optim/native.py writes at every build from its
 * ITEM_FIELDS and from the rule table of kernelgeo/optim/step_rules.py (c_header): the ctypes
 * structure and this code share one definition. */
#include "kg_generated.h"

/* The layout of kg_item as this library was compiled (size, field offsets) and the rule
 * codes, compared with the ctypes structure by native.check_abi before any step: returns
 * the number of values (n or more: fills n). */
int64_t kg_abi(int64_t *out, int64_t n) {
    const int64_t m = (int64_t)(sizeof kg_abi_table / sizeof kg_abi_table[0]);
    for (int64_t i = 0; i < n && i < m; ++i) out[i] = kg_abi_table[i];
    return m;
}

/* g_k = lambda / max(1, Gamma_k), Gamma_k = lambda R_k / cap:
 * kernelgeo.optim.step_rules.step_sizes */
static double kg_step_size(const kg_item *it, double rn) {
    if (it->rule != KG_RULE_CAPPED)
        return it->lr;
    double gam = rn * (it->lr / it->cap);
    return it->lr / (gam > 1.0 ? gam : 1.0);
}

/* a sum of squares that can be used: positive and finite (else: rescaled fallback) */
#define KG_OK_SUM(v) ((v) > 0.0 && isfinite(v))

/* T-precision square root: plain sqrt() of a float computes in double (with conversions) */
#define T float
#define NAME(x) x##_f32
#define SQRT sqrtf
#include __FILE__
#undef T
#undef NAME
#undef SQRT
#define T double
#define NAME(x) x##_f64
#define SQRT sqrt
#include __FILE__
#undef T
#undef NAME
#undef SQRT

#else /* ------------------------------------------------------------- typed body */

/* Whether every gradient entry of every item is finite: index of the first bad item, or -1. */
int64_t NAME(kg_check)(const kg_item *items, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const T *g = (const T *)items[i].g;
        const int64_t m = items[i].nblk * items[i].a * items[i].s;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < m; ++k) acc += g[k] * (T)0; /* NaN iff some entry is NaN/Inf */
        if (acc != acc) return i;
    }
    return -1;
}

/* The same for n plain arrays (Euclidean gradients): index of the first bad one, or -1. */
int64_t NAME(kg_check_arrays)(const void *const *ptrs, const int64_t *sizes, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const T *g = (const T *)ptrs[i];
        const int64_t m = sizes[i];
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < m; ++k) acc += g[k] * (T)0;
        if (acc != acc) return i;
    }
    return -1;
}

/* Largest |entry| of every item's gradient, or NaN when some entry is NaN or Inf: the
 * optimizer's pre-pass (finiteness, and whether the step's sums could overflow). */
double NAME(kg_amax)(const kg_item *items, int64_t n) {
    double out = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const T *g = (const T *)items[i].g;
        const int64_t m = items[i].nblk * items[i].a * items[i].s;
        T mx = 0, acc = 0;
#pragma omp simd reduction(max : mx) reduction(+ : acc)
        for (int64_t k = 0; k < m; ++k) {
            const T v = g[k] < 0 ? -g[k] : g[k];
            mx = v > mx ? v : mx;
            acc += g[k] * (T)0; /* NaN iff some entry is NaN/Inf */
        }
        if (acc != acc) return NAN;
        if ((double)mx > out) out = (double)mx;
    }
    return out;
}

/* The same for n plain arrays (Euclidean gradients). */
double NAME(kg_amax_arrays)(const void *const *ptrs, const int64_t *sizes, int64_t n) {
    double out = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const T *g = (const T *)ptrs[i];
        const int64_t m = sizes[i];
        T mx = 0, acc = 0;
#pragma omp simd reduction(max : mx) reduction(+ : acc)
        for (int64_t k = 0; k < m; ++k) {
            const T v = g[k] < 0 ? -g[k] : g[k];
            mx = v > mx ? v : mx;
            acc += g[k] * (T)0;
        }
        if (acc != acc) return NAN;
        if ((double)mx > out) out = (double)mx;
    }
    return out;
}

/* One component (a entries at stride st) in double with explicit passes and a rescaled norm:
 * the fallback when the fast kernels' sums overflow (entries near the largest float). */
static void NAME(comp_safe)(const kg_item *it, T *x, const T *g, T *b, int64_t a, int64_t st,
                            double mu, double damp, int nest, int64_t comp) {
    const double r2 = it->r * it->r;
    const int fresh = it->fresh;
    const double cu = fresh ? 1.0 : 1.0 - damp, mb = fresh ? 0.0 : mu;
    double gm = 0.0, sx = 0, sg = 0, sxg = 0, sc = 0.0;
    for (int64_t k = 0; k < a; ++k) gm = fmax(gm, fabs((double)g[k * st]));
    sc = gm > 0.0 && isfinite(gm) ? 1.0 / gm : 1.0; /* u is computed for g/gm, then scaled */
    for (int64_t k = 0; k < a; ++k) {
        double xv = x[k * st], gv = g[k * st] * sc;
        sx += xv;
        sg += gv;
        sxg += xv * gv;
    }
    const double mg = it->center ? sg / (double)a : 0.0, ac = (sxg - mg * sx) / r2;
    double dd = 0, db = 0, bm = 0.0;
    for (int64_t k = 0; k < a; ++k) {
        const int64_t e = k * st;
        double u = ((double)g[e] * sc - mg - ac * (double)x[e]) / sc, d;
        if (b) {
            double bn = (fresh ? 0.0 : mb * (double)b[e]) + cu * u;
            b[e] = (T)bn;
            d = nest ? u + mu * (double)b[e] : (double)b[e];
        } else {
            d = u;
        }
        bm = fmax(bm, fabs(d));
    }
    const double ds = bm > 0.0 && isfinite(bm) ? 1.0 / bm : 1.0;
    for (int64_t k = 0; k < a; ++k) {
        const int64_t e = k * st;
        double u = ((double)g[e] * sc - mg - ac * (double)x[e]) / sc;
        double d = b ? (nest ? u + mu * (double)b[e] : (double)b[e]) : u;
        dd += (d * ds) * (d * ds);
        if (b) db += (d * ds) * ((double)b[e] * ds);
    }
    const double rn = sqrt(dd) / ds, stp = kg_step_size(it, rn);
    if (it->rn_out) it->rn_out[comp] = rn;
    if (it->step_out) it->step_out[comp] = stp;
    double ym = 0.0, yy = 0.0;
    for (int pass = 0; pass < 2; ++pass)
        for (int64_t k = 0; k < a; ++k) {
            const int64_t e = k * st;
            double u = ((double)g[e] * sc - mg - ac * (double)x[e]) / sc;
            double d = b ? (nest ? u + mu * (double)b[e] : (double)b[e]) : u;
            double y = (double)x[e] - stp * d;
            if (pass == 0) ym = fmax(ym, fabs(y));
            else yy += (y / ym) * (y / ym);
        }
    const double c = it->r / (ym * sqrt(yy));
    /* c g <d, B> / r^2 with <d, B> = db / ds^2 and |d| = sqrt(dd) / ds, computed as
     * (g |d|) <d, B>/|d|: the step length g |d| is bounded, the other factor is at most |B| */
    const double coef = dd > 0.0 ? c * (stp * rn) * (db / (ds * sqrt(dd))) / r2 : 0.0;
    for (int64_t k = 0; k < a; ++k) {
        const int64_t e = k * st;
        double u = ((double)g[e] * sc - mg - ac * (double)x[e]) / sc;
        double d = b ? (nest ? u + mu * (double)b[e] : (double)b[e]) : u;
        double xn = c * ((double)x[e] - stp * d);
        x[e] = (T)xn;
        if (b) b[e] = (T)((double)b[e] + coef * xn);
    }
}

/* Ask for the next chunk's data while this one is computed (the slices kernel: its chunk
 * computation is long enough that the next chunk's first reads otherwise wait on memory
 * when kernels do not fit in the caches; ~10% on ResNet-50-sized data; for the plain
 * streaming kernels the hardware prefetcher does better alone, measured). */
#if defined(__GNUC__) || defined(__clang__)
#define KG_PREFETCH(xp, gp, bp, len)                                                         \
    do {                                                                                     \
        for (int64_t pf = 0; pf < (len); pf += 64 / (int64_t)sizeof(T)) {                    \
            __builtin_prefetch((xp) + pf, 1);                                                \
            __builtin_prefetch((gp) + pf, 0);                                                \
            if (bp) __builtin_prefetch((const T *)(bp) + pf, 1);                             \
        }                                                                                    \
    } while (0)
#else
#define KG_PREFETCH(xp, gp, bp, len) ((void)0)
#endif
#define KG_FIN(v) isfinite((double)(v))

/* Rows (s = 1, a > KG_SHORT): three passes per row, all sums in T with vector partial sums.
 * Pass 1: <x,G>, |x|^2 (and the sums for centring); pass 2: |d|^2, <d,B>, <x,d> without
 * writing; pass 3: x' and the transported B written once.  |y|^2 = |x|^2 - 2g<x,d> + g^2|d|^2
 * (no cancellation: <x,d> ~ 0 and |x|^2 ~ r^2), so y is never stored. */
static void NAME(rows)(const kg_item *it, double mu, double damp, int nest) {
    T *X = (T *)it->x;
    const T *G = (const T *)it->g;
    T *B = (T *)it->b;
    const int64_t n = it->a;
    const double r2 = it->r * it->r;
    const int fresh = it->fresh;
    const T cu = (T)(fresh ? 1.0 : 1.0 - damp), mb = (T)(fresh ? 0.0 : mu), tmu = (T)mu;
    for (int64_t i = 0; i < it->nblk; ++i) {
        T *x = X + i * n;
        const T *g = G + i * n;
        T *b = B ? B + i * n : NULL;
        T sx = 0, sg = 0, sxg = 0, sxx = 0;
        if (it->center) {
#pragma omp simd reduction(+ : sx, sg, sxg, sxx)
            for (int64_t k = 0; k < n; ++k) {
                sx += x[k];
                sg += g[k];
                sxg += x[k] * g[k];
                sxx += x[k] * x[k];
            }
        } else {
#pragma omp simd reduction(+ : sxg, sxx)
            for (int64_t k = 0; k < n; ++k) {
                sxg += x[k] * g[k];
                sxx += x[k] * x[k];
            }
        }
        const double dmg = it->center ? (double)sg / (double)n : 0.0;
        const T mg = (T)dmg, ac = (T)(((double)sxg - dmg * (double)sx) / r2);
        T dd = 0, db = 0, sxd = 0;
        if (b && fresh && !nest) {
#pragma omp simd reduction(+ : dd, sxd)
            for (int64_t k = 0; k < n; ++k) {
                T bn = cu * (g[k] - mg - ac * x[k]);
                dd += bn * bn;
                sxd += x[k] * bn;
            }
            db = dd;
        } else if (b && !nest) {
#pragma omp simd reduction(+ : dd, sxd)
            for (int64_t k = 0; k < n; ++k) {
                T bn = mb * b[k] + cu * (g[k] - mg - ac * x[k]);
                dd += bn * bn;
                sxd += x[k] * bn;
            }
            db = dd;
        } else if (b) {
#pragma omp simd reduction(+ : dd, db, sxd)
            for (int64_t k = 0; k < n; ++k) {
                T u = g[k] - mg - ac * x[k];
                T bn = mb * b[k] + cu * u, d = u + tmu * bn;
                dd += d * d;
                db += d * bn;
                sxd += x[k] * d;
            }
        } else {
#pragma omp simd reduction(+ : dd, sxd)
            for (int64_t k = 0; k < n; ++k) {
                T u = g[k] - mg - ac * x[k];
                dd += u * u;
                sxd += x[k] * u;
            }
        }
        if (!(KG_FIN(sxg) && KG_FIN(sxx) && KG_FIN(sx) && KG_FIN(sg) && KG_FIN(dd) &&
              KG_FIN(db) && KG_FIN(sxd))) {
            NAME(comp_safe)(it, x, g, b, n, 1, mu, damp, nest, i);
            continue;
        }
        const double rn = sqrt((double)dd), st = kg_step_size(it, rn);
        if (it->rn_out) it->rn_out[i] = rn;
        if (it->step_out) it->step_out[i] = st;
        const double yy = (double)sxx - 2.0 * st * (double)sxd + st * st * (double)dd;
        const double dc = it->r / sqrt(yy);
        const T c = (T)dc, cs = (T)(dc * st), coef = (T)(dc * st * (double)db / r2);
        if (b && fresh && !nest) {
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) {
                T bn = cu * (g[k] - mg - ac * x[k]);
                T xn = c * x[k] - cs * bn;
                x[k] = xn;
                b[k] = bn + coef * xn;
            }
        } else if (b && !nest) {
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) {
                T bn = mb * b[k] + cu * (g[k] - mg - ac * x[k]);
                T xn = c * x[k] - cs * bn;
                x[k] = xn;
                b[k] = bn + coef * xn;
            }
        } else if (b) {
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) {
                T u = g[k] - mg - ac * x[k];
                T bn = mb * b[k] + cu * u;
                T xn = c * x[k] - cs * (u + tmu * bn);
                x[k] = xn;
                b[k] = bn + coef * xn;
            }
        } else {
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) x[k] = c * x[k] - cs * (g[k] - mg - ac * x[k]);
        }
    }
}

/* Short components (a <= KG_SHORT), any s: the per-component scalar work (square roots,
 * divisions, loop set-up) would dominate a component-by-component kernel, so KG_W components
 * at a time are copied into local arrays (entry k of component w at [k][w]) and every step is
 * a loop over w that the compiler vectorises.  Component c has its entries at
 * (c / s) * a * s + c % s + k * s. */
static void NAME(short_any)(const kg_item *it, double mu, double damp, int nest) {
    const int64_t a = it->a, s = it->s;
    T *X = (T *)it->x;
    const T *Gp = (const T *)it->g;
    T *Bp = (T *)it->b;
    const int64_t ncomp = it->nblk * s;
    const double r2 = it->r * it->r;
    const T ir2 = (T)(1.0 / r2), ia = (T)(1.0 / (double)a), tmu = (T)mu;
    const int fresh = it->fresh, has_b = Bp != NULL, center = it->center, rule = it->rule;
    const T cu = (T)(fresh ? 1.0 : 1.0 - damp), mb = (T)(fresh ? 0.0 : mu);
    const T lr = (T)it->lr, lr_rm = (T)(it->lr / it->cap);
    const T r = (T)it->r;
    const T big = (T)(sizeof(T) == 4 ? 3.4028234663852886e38 : 1.7976931348623157e308);
    T x[KG_SHORT][KG_W], g[KG_SHORT][KG_W], b[KG_SHORT][KG_W];
    T mg[KG_W], ac[KG_W], dd[KG_W], db[KG_W], st[KG_W], yy[KG_W], c[KG_W], coef[KG_W];
    T sx[KG_W], sg[KG_W], sxg[KG_W];
    int64_t base[KG_W];
    for (int64_t c0 = 0; c0 < ncomp; c0 += KG_W) {
        const int64_t nw = ncomp - c0 < KG_W ? ncomp - c0 : KG_W;
        if (s == 1) {
            for (int64_t w = 0; w < KG_W; ++w) base[w] = (c0 + (w < nw ? w : 0)) * a;
        } else { /* one division per batch: the lanes step through (block, column) pairs */
            int64_t blk = c0 / s, j = c0 % s;
            for (int64_t w = 0; w < KG_W; ++w) {
                base[w] = w < nw ? blk * a * s + j : base[0]; /* padding repeats lane 0 */
                if (++j == s) {
                    j = 0;
                    ++blk;
                }
            }
        }
        if (nw == KG_W && s == 1) { /* contiguous components: affine addresses */
            const T *xp = X + c0 * a, *gp = Gp + c0 * a, *bp = Bp ? Bp + c0 * a : NULL;
            for (int64_t k = 0; k < a; ++k)
#pragma omp simd
                for (int64_t w = 0; w < KG_W; ++w) {
                    x[k][w] = xp[w * a + k];
                    g[k][w] = gp[w * a + k];
                    b[k][w] = has_b && !fresh ? bp[w * a + k] : (T)0;
                }
        } else {
            for (int64_t k = 0; k < a; ++k)
                for (int64_t w = 0; w < KG_W; ++w) {
                    x[k][w] = X[base[w] + k * s];
                    g[k][w] = Gp[base[w] + k * s];
                    b[k][w] = has_b && !fresh ? Bp[base[w] + k * s] : (T)0;
                }
        }
#pragma omp simd
        for (int64_t w = 0; w < KG_W; ++w) sx[w] = sg[w] = sxg[w] = dd[w] = db[w] = yy[w] = 0;
        for (int64_t k = 0; k < a; ++k)
#pragma omp simd
            for (int64_t w = 0; w < KG_W; ++w) {
                sx[w] += x[k][w];
                sg[w] += g[k][w];
                sxg[w] += x[k][w] * g[k][w];
            }
#pragma omp simd
        for (int64_t w = 0; w < KG_W; ++w) {
            mg[w] = center ? sg[w] * ia : (T)0;
            ac[w] = (sxg[w] - mg[w] * sx[w]) * ir2;
        }
        for (int64_t k = 0; k < a; ++k)
#pragma omp simd
            for (int64_t w = 0; w < KG_W; ++w) {
                T u = g[k][w] - mg[w] - ac[w] * x[k][w], d = u;
                if (has_b) {
                    T bn = mb * b[k][w] + cu * u;
                    b[k][w] = bn;
                    d = nest ? u + tmu * bn : bn;
                    db[w] += d * bn;
                }
                dd[w] += d * d;
                g[k][w] = d; /* G is not needed any more: keep the direction */
            }
#pragma omp simd
        for (int64_t w = 0; w < KG_W; ++w) {
            const T rn = SQRT(dd[w]);
            T gam = rule == KG_RULE_CAPPED ? rn * lr_rm : 0;
            st[w] = lr / (gam > 1 ? gam : 1);
            dd[w] = rn;
        }
        for (int64_t k = 0; k < a; ++k)
#pragma omp simd
            for (int64_t w = 0; w < KG_W; ++w) {
                T y = x[k][w] - st[w] * g[k][w];
                x[k][w] = y;
                yy[w] += y * y;
            }
        int bad = 0;
#pragma omp simd reduction(| : bad)
        for (int64_t w = 0; w < KG_W; ++w) {
            bad |= !(yy[w] > 0 && yy[w] <= big) | !(dd[w] <= big) | !(fabs(db[w]) <= big);
            c[w] = r / SQRT(yy[w]);
            coef[w] = c[w] * st[w] * db[w] * ir2;
        }
        if (bad) { /* an overflowing sum: redo this batch's components in double, rescaled */
            for (int64_t w = 0; w < nw; ++w)
                NAME(comp_safe)(it, X + base[w], Gp + base[w], Bp ? Bp + base[w] : NULL, a, s,
                                mu, damp, nest, c0 + w);
            continue;
        }
        for (int64_t w = 0; w < nw; ++w) {
            if (it->rn_out) it->rn_out[c0 + w] = dd[w];
            if (it->step_out) it->step_out[c0 + w] = st[w];
        }
        if (nw == KG_W && s == 1) {
            T *xp = X + c0 * a, *bp = Bp ? Bp + c0 * a : NULL;
            for (int64_t k = 0; k < a; ++k)
#pragma omp simd
                for (int64_t w = 0; w < KG_W; ++w) {
                    const T xn = c[w] * x[k][w];
                    xp[w * a + k] = xn;
                    if (has_b) bp[w * a + k] = b[k][w] + coef[w] * xn;
                }
        } else {
            for (int64_t k = 0; k < a; ++k)
                for (int64_t w = 0; w < nw; ++w) {
                    const T xn = c[w] * x[k][w];
                    X[base[w] + k * s] = xn;
                    if (has_b) Bp[base[w] + k * s] = b[k][w] + coef[w] * xn;
                }
        }
    }
}

/* Components of exactly 3 entries (3x3 kernels).  The core works on m <= KG_CH contiguous
 * triples (entries 3q, 3q+1, 3q+2 of component q): a branch-free loop over components that
 * the compiler vectorises (the stride-3 loads become shuffles), all per-component scalars
 * (norms, square roots, step rule) being vector lanes.  It writes the new point and buffer
 * into local structure-of-arrays buffers (NX[k][q]: unit-stride vector stores; AVX-512
 * scatters were 4x slower) and a per-component flag OK (no sum overflowed); the callers
 * copy back what is OK and redo the rest with comp_safe.  Returns the number of OK. */
#define KG_CH 384 /* components per chunk: a multiple of 3 (whole 3x3 slices) and of 64 */
static inline __attribute__((always_inline)) int64_t NAME(short3_core)(
    const kg_item *it, const T *x, const T *g, const T *b, int64_t m, double mu, double damp,
    int nest, int hb, int center, T NX[3][KG_CH], T NB[3][KG_CH], T RN[KG_CH], T ST[KG_CH],
    int OK[KG_CH]) {
    const int rule = it->rule;
    const T ir2 = (T)(1.0 / (it->r * it->r)), tmu = (T)mu, r = (T)it->r;
    const T cu = (T)(it->fresh ? 1.0 : 1.0 - damp), mb = (T)(it->fresh ? 0.0 : mu);
    const T third = (T)(1.0 / 3.0);
    const T lr = (T)it->lr;
    const T lr_rm = (T)(it->lr / it->cap), w1 = (T)(rule == KG_RULE_CAPPED);
    const T big = (T)(sizeof(T) == 4 ? 3.4028234663852886e38 : 1.7976931348623157e308);
    int64_t nok = 0;
#pragma omp simd reduction(+ : nok)
    for (int64_t q = 0; q < m; ++q) {
        T x0 = x[3 * q], x1 = x[3 * q + 1], x2 = x[3 * q + 2];
        T g0 = g[3 * q], g1 = g[3 * q + 1], g2 = g[3 * q + 2];
        T mg = center ? (g0 + g1 + g2) * third : (T)0, sx = center ? x0 + x1 + x2 : (T)0;
        T ac = (x0 * g0 + x1 * g1 + x2 * g2 - mg * sx) * ir2;
        T u0 = g0 - mg - ac * x0, u1 = g1 - mg - ac * x1, u2 = g2 - mg - ac * x2;
        T b0 = u0, b1 = u1, b2 = u2, d0 = u0, d1 = u1, d2 = u2, db = 0;
        if (hb) {
            b0 = mb * b[3 * q] + cu * u0;
            b1 = mb * b[3 * q + 1] + cu * u1;
            b2 = mb * b[3 * q + 2] + cu * u2;
            d0 = nest ? u0 + tmu * b0 : b0;
            d1 = nest ? u1 + tmu * b1 : b1;
            d2 = nest ? u2 + tmu * b2 : b2;
            db = d0 * b0 + d1 * b1 + d2 * b2;
        }
        T dd = d0 * d0 + d1 * d1 + d2 * d2, rn = SQRT(dd);
        T gam = w1 * (rn * lr_rm);
        /* with gm1 = max(1, Gamma) the step is lr/gm1; y = x - (lr/gm1) d is computed as
         * z = gm1 y = gm1 x - lr d, so that x' = r z/|z| and the transport coefficient
         * (r/|y|)(lr/gm1)<d,B>/r^2 = lr (r/|z|) <d,B>/r^2 need one division, not three */
        T gm1 = gam > 1 ? gam : 1;
        T z0 = gm1 * x0 - lr * d0, z1 = gm1 * x1 - lr * d1, z2 = gm1 * x2 - lr * d2;
        T zz = z0 * z0 + z1 * z1 + z2 * z2;
        int ok = (zz > 0) & (zz <= big) & (dd <= big) & (db <= big) & (db >= -big) &
                 (gam <= big);
        T c = r / SQRT(zz), coef = lr * c * db * ir2;
        NX[0][q] = c * z0;
        NX[1][q] = c * z1;
        NX[2][q] = c * z2;
        NB[0][q] = b0 + coef * NX[0][q];
        NB[1][q] = b1 + coef * NX[1][q];
        NB[2][q] = b2 + coef * NX[2][q];
        RN[q] = rn;
        ST[q] = gm1; /* the step size is lr / gm1 (divided only where it is recorded) */
        OK[q] = ok;
        nok += ok;
    }
    return nok;
}

/* the core with centring and Nesterov as constants: their operations vanish when off */
#define KG_CORE(it, x, g, b, m, hb, ok)                                                      \
    ((it)->center                                                                            \
         ? (nest ? NAME(short3_core)(it, x, g, b, m, mu, damp, 1, hb, 1, NX, NB, RN, ST, ok) \
                 : NAME(short3_core)(it, x, g, b, m, mu, damp, 0, hb, 1, NX, NB, RN, ST, ok))\
         : (nest ? NAME(short3_core)(it, x, g, b, m, mu, damp, 1, hb, 0, NX, NB, RN, ST, ok) \
                 : NAME(short3_core)(it, x, g, b, m, mu, damp, 0, hb, 0, NX, NB, RN, ST, ok)))

/* Columns stored contiguously (the layout of oblique kernels whose last two dimensions are
 * swapped in memory): component q is entries 3q..3q+2 of the kernel itself. */
#define KG_DEF_SHORT3_ROWS(HB)                                                               \
    static void NAME(short3_rows_##HB)(const kg_item *it, double mu, double damp, int nest) { \
        T *X = (T *)it->x, *Bp = (T *)it->b;                                                 \
        const T *G = (const T *)it->g;                                                       \
        T NX[3][KG_CH], NB[3][KG_CH], RN[KG_CH], ST[KG_CH];                                  \
        int OK[KG_CH];                                                                       \
        for (int64_t c0 = 0; c0 < it->nblk; c0 += KG_CH) {                                   \
            const int64_t m = it->nblk - c0 < KG_CH ? it->nblk - c0 : KG_CH;                 \
            T *x = X + 3 * c0, *b = HB ? Bp + 3 * c0 : NULL;                                 \
            const T *g = G + 3 * c0;                                                         \
            const int64_t nok = KG_CORE(it, x, g, HB ? b : x, m, HB, OK);                    \
            if (nok == m) { /* the usual case: interleave back (vector shuffles) */          \
                for (int64_t q = 0; q < m; ++q)                                              \
                    for (int k = 0; k < 3; ++k) x[3 * q + k] = NX[k][q];                     \
                for (int64_t q = 0; HB && q < m; ++q)                                        \
                    for (int k = 0; k < 3; ++k) b[3 * q + k] = NB[k][q];                     \
                for (int64_t q = 0; it->rn_out && q < m; ++q) it->rn_out[c0 + q] = RN[q];    \
                for (int64_t q = 0; it->step_out && q < m; ++q)                                  \
                it->step_out[c0 + q] = it->lr / ST[q];                                       \
                continue;                                                                    \
            }                                                                                \
            for (int64_t q = 0; q < m; ++q) {                                                \
                if (!OK[q]) { /* rare: an overflowing sum; redo in double */                 \
                    NAME(comp_safe)(it, x + 3 * q, g + 3 * q, HB ? b + 3 * q : NULL, 3, 1,   \
                                    mu, damp, nest, c0 + q);                                 \
                    continue;                                                                \
                }                                                                            \
                for (int k = 0; k < 3; ++k) x[3 * q + k] = NX[k][q];                         \
                if (HB)                                                                      \
                    for (int k = 0; k < 3; ++k) b[3 * q + k] = NB[k][q];                     \
                if (it->rn_out) it->rn_out[c0 + q] = RN[q];                                  \
                if (it->step_out) it->step_out[c0 + q] = it->lr / ST[q];                     \
            }                                                                                \
        }                                                                                    \
    }

/* Contiguous 3x3 slices (the layout kernelgeo.constrain stores): column j of slice i is
 * entries 9i + j + 3k.  Compilers vectorise interleaved accesses in groups of 3 with shuffles,
 * but not the groups of 9 a slice would need (those become slow gathers), so a chunk of
 * KG_CH/3 slices goes through two group-of-3 steps: the rows r = 3i + k of the chunk are split
 * by column, XJ[j][r] = x[3r + j], after which column j of every slice is the contiguous
 * triple XJ[j][3i..3i+2] that the core takes; the results come back the same way. */
#define KG_DEF_SHORT3_SLICES(HB)                                                             \
    static void NAME(short3_slices_##HB)(const kg_item *it, double mu, double damp,          \
                                          int nest) {                                        \
        T *X = (T *)it->x, *Bp = (T *)it->b;                                                 \
        const T *G = (const T *)it->g;                                                       \
        T XJ[3][KG_CH], GJ[3][KG_CH], BJ[3][KG_CH], TX[3][KG_CH], TB[3][KG_CH];              \
        T NX[3][KG_CH], NB[3][KG_CH], RN[KG_CH], ST[KG_CH];                                  \
        int OK[3][KG_CH];                                                                    \
        for (int64_t i0 = 0; i0 < it->nblk; i0 += KG_CH / 3) {                               \
            const int64_t ns = it->nblk - i0 < KG_CH / 3 ? it->nblk - i0 : KG_CH / 3;        \
            const int64_t rows = 3 * ns;                                                     \
            T *x = X + 9 * i0, *b = HB ? Bp + 9 * i0 : NULL;                                 \
            const T *g = G + 9 * i0;                                                         \
            for (int64_t r = 0; r < rows; ++r)                                               \
                for (int j = 0; j < 3; ++j) {                                                \
                    XJ[j][r] = x[3 * r + j];                                                 \
                    GJ[j][r] = g[3 * r + j];                                                 \
                }                                                                            \
            for (int64_t r = 0; HB && r < rows; ++r)                                         \
                for (int j = 0; j < 3; ++j) BJ[j][r] = b[3 * r + j];                         \
            KG_PREFETCH(x + 9 * ns, g + 9 * ns, HB ? b + 9 * ns : NULL,                      \
                        (it->nblk - i0 - ns < KG_CH / 3 ? it->nblk - i0 - ns : KG_CH / 3) * 9); \
            int64_t nok = 0;                                                                 \
            for (int j = 0; j < 3; ++j) {                                                    \
                nok += KG_CORE(it, XJ[j], GJ[j], HB ? BJ[j] : XJ[j], ns, HB, OK[j]);         \
                for (int64_t q = 0; q < ns; ++q)                                             \
                    for (int k = 0; k < 3; ++k) TX[j][3 * q + k] = NX[k][q];                 \
                for (int64_t q = 0; HB && q < ns; ++q)                                       \
                    for (int k = 0; k < 3; ++k) TB[j][3 * q + k] = NB[k][q];                 \
                for (int64_t q = 0; it->rn_out && q < ns; ++q)                               \
                    it->rn_out[3 * (i0 + q) + j] = RN[q];                                    \
                for (int64_t q = 0; it->step_out && q < ns; ++q)                             \
                    it->step_out[3 * (i0 + q) + j] = it->lr / ST[q];                         \
            }                                                                                \
            if (nok == 3 * ns) { /* the usual case: interleave the rows back */              \
                for (int64_t r = 0; r < rows; ++r)                                           \
                    for (int j = 0; j < 3; ++j) x[3 * r + j] = TX[j][r];                     \
                for (int64_t r = 0; HB && r < rows; ++r)                                     \
                    for (int j = 0; j < 3; ++j) b[3 * r + j] = TB[j][r];                     \
                continue;                                                                    \
            }                                                                                \
            for (int64_t q = 0; q < ns; ++q) /* rare: an overflowing sum somewhere */        \
                for (int j = 0; j < 3; ++j) {                                                \
                    if (!OK[j][q]) {                                                         \
                        NAME(comp_safe)(it, x + 9 * q + j, g + 9 * q + j,                    \
                                        HB ? b + 9 * q + j : NULL, 3, 3, mu, damp, nest,     \
                                        3 * (i0 + q) + j);                                   \
                        continue;                                                            \
                    }                                                                        \
                    for (int k = 0; k < 3; ++k) {                                            \
                        x[9 * q + 3 * k + j] = TX[j][3 * q + k];                             \
                        if (HB) b[9 * q + 3 * k + j] = TB[j][3 * q + k];                     \
                    }                                                                        \
                }                                                                            \
        }                                                                                    \
    }
KG_DEF_SHORT3_ROWS(0)
KG_DEF_SHORT3_ROWS(1)
KG_DEF_SHORT3_SLICES(0)
KG_DEF_SHORT3_SLICES(1)

/* Columns of a*s slices (s > 1, a > KG_SHORT): component by component, in double. */
static void NAME(cols)(const kg_item *it, double mu, double damp, int nest) {
    const int64_t a = it->a, s = it->s;
    for (int64_t i = 0; i < it->nblk; ++i)
        for (int64_t j = 0; j < s; ++j) {
            const int64_t off = i * a * s + j;
            NAME(comp_safe)(it, (T *)it->x + off, (const T *)it->g + off,
                            it->b ? (T *)it->b + off : NULL, a, s, mu, damp, nest, i * s + j);
        }
}

/* One step of every item; returns the number of items updated (all of them), or -1 when an
 * item's layout is out of range (nothing written). */
int64_t NAME(kg_sphere_step)(const kg_item *items, int64_t n, double mu, double damp,
                             int32_t nest) {
    for (int64_t i = 0; i < n; ++i)
        if (items[i].s > KG_MAXS || items[i].s < 1 || items[i].a < 1) return -1;
    for (int64_t i = 0; i < n; ++i) {
        const kg_item *it = &items[i];
        const int hb = it->b != NULL;
        if (it->a == 3 && it->s == 1) {
            if (hb) NAME(short3_rows_1)(it, mu, damp, nest);
            else NAME(short3_rows_0)(it, mu, damp, nest);
        } else if (it->a == 3 && it->s == 3) {
            if (hb) NAME(short3_slices_1)(it, mu, damp, nest);
            else NAME(short3_slices_0)(it, mu, damp, nest);
        }
        else if (it->a <= KG_SHORT) NAME(short_any)(it, mu, damp, nest);
        else if (it->s == 1) NAME(rows)(it, mu, damp, nest);
        else NAME(cols)(it, mu, damp, nest);
    }
    return n;
}

#endif
