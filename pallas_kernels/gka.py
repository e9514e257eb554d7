"""Gated KalmaNet (GKA): gated linear attention read through a ridge-regression solve.

Per head the layer keeps two decayed statistics of the past (same log decay g for both):

    H_t = e^{g_t} H_{t-1} + k_t k_tᵀ                  h_kk  [B, H, K, K]
    h_kv_t = e^{g_t} h_kv_{t-1} + k_t v_tᵀ            h_kv  [B, H, K, V]

h_kv is the transpose of SPEC §5's U_t (= Σ decayed v kᵀ), stored [K, V] like the simple_gla state.
Each token solves (H_t + λ_t I) x_t = q_t with the relative ridge λ_t = r·‖H_t‖_F by a fixed number of
Chebyshev iterations (spectrum bounds [λ, λ + ‖H‖_F], so no eigenvalue estimate is needed), blends
q̃_t = q_t + α_t (x_t − q_t), and reads out o_t = scale·h_kv_tᵀ q̃_t. That read-out is simple gated linear
attention with query q̃, so the chunked form only has to produce x: per chunk of C tokens it applies
H_t = e^{G_t} H₀ + Σ_{s≤t} e^{G_t − G_s} k_s k_sᵀ implicitly from the chunk-start state H₀, all C rows at once.
Gradients of the solve are implicit (one more Chebyshev solve with the transposed, here identical, operator),
never the unrolled iterations.
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (acc_dtype, check_pallas_chunk, check_qkv, chunk_decay, einsum, from_chunks,
                                    from_head_chunks, resolve_impl, to_chunks, to_head_chunks)
from pallas_kernels._pallas import (BF16X3, F16, Backend, backend_for, dot, operand, pad_axis, pow2_at_least,
                                    scaled_f16, split16, tile_max, tile_sum)
from pallas_kernels.chunk_output import decay_matrix
from pallas_kernels.chunk_scan import ScanConfig, scan
from pallas_kernels.simple_gla import _pallas as simple_gla_pallas
from pallas_kernels.simple_gla import simple_gla

__all__ = ["gka", "gka_step"]


def _safe_sqrt(x):
    """sqrt with a zero (not infinite) gradient at 0, so all-zero keys give finite gradients."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1)), 0)


def _chebyshev(residual, q, lam, f, num_iter, first=(None, 0)):
    """Chebyshev iteration for (H + λI) x = q with spec(H) ⊂ [0, f]; rows with f = 0 stay at x = 0.

    In residual form: each product acts on the step's update Δ = x_{k+1} − x_k, which shrinks as the iteration
    converges, while x and the residual r = q − (H + λI) x accumulate in q's dtype (float32 or float64). Rounding
    a product's operand then perturbs r by ε‖H‖‖Δ‖ instead of ε‖H‖‖x‖, and x ≈ q/λ is large where no recent key
    points (the read-out amplifies errors there up to 1/r = 50×). With fp16 operands in one part, GKA's bf16 output
    error was 2.8e-3 as with float32 products, against 9.4e-3–6.7e-2 in the x-form (x_{k+1} from A x_k; measured on
    a CPU with the products emulated); in float32 throughout, 2.4e-6 off float64 against 8.1e-6 (chunked, on
    (1, 1000, 2, 128, 128)). Same iterates in exact arithmetic, same number of products (num_iter).
    residual(r, d) returns r − H d: the kernels' operators fold their product terms into r one FMA each (the fp16
    solve's main loop 449 instructions per warp and iteration against 491 for r − (H d) − λd; 6.95 against 7.03 ms
    at T = 32768 on an H200). first = (residual, n): the first n products take that operator instead (a more
    accurate one while Δ is large)."""
    den = 2 * lam + f
    gamma = jnp.where(den > 0, 2 / jnp.where(den > 0, den, 1), 0)
    c = (f * gamma / 4) ** 2  # (ρ/2)², ρ = f / (2λ + f)
    x = gamma * q
    if num_iter == 0:
        return x
    residual_first, n_first = first
    residual_first = residual_first if n_first else residual

    def update(omega, d, r):
        omega = 1 / (1 - c * omega)
        return omega, omega * gamma * r + (omega - 1) * d

    def body(residual):
        def step(_, carry):
            x, d, r, omega = carry
            omega, d = update(omega, d, r)
            return x + d, d, residual(r - lam * d, d), omega
        return step

    carry = (x, x, residual_first(q - lam * x, x), jnp.full_like(c, 2))
    split = min(max(n_first - 1, 0), num_iter - 1)  # the products after the first, in the loop
    carry = jax.lax.fori_loop(0, split, body(residual_first), carry)
    x, d, r, omega = jax.lax.fori_loop(split, num_iter - 1, body(residual), carry)
    return x + update(omega, d, r)[1]


@dataclasses.dataclass(frozen=True)
class Solver:
    """num_iter Chebyshev iterations, in XLA (backend None; its products at `precision`, float32-accurate: HIGHEST,
    or three TF32 passes on GPU tensor cores) or in the Pallas kernel (chunk operators only)."""

    num_iter: int
    backend: Backend | None = None
    precision: object = jax.lax.Precision.HIGHEST
    keys_exact: bool = False
    # Rows of a chunk per kernel program (rows are independent; at least 16 on Triton) and warps per program. The
    # residual form's fp16 kernel (bf16 keys, 30 iterations, T = 32768, H200), each block against its own keys
    # (_chebyshev_kernel): 32 rows at 4 warps 7.00 ms; 16 rows 9.38, 2 warps 19.89 (the keys before a block then
    # in one product over the whole chunk). Before, against the whole chunk's keys: 32 rows 8.12 ms, 8 warps 10.84;
    # 16 rows 10.39 (2 warps 12.75, 8 warps 14.36); 64 rows 14.39 (8 warps 10.36); 8 rows 18.53 (2 warps 22.27).
    # In the x-form (6 fp16 passes, H100) 16 rows had been fastest (13.91 against 19.55 for 32).
    block_rows: int = 32
    num_warps: int = 4

    def __call__(self, apply_h, ops, rhs, lam, f):
        if self.backend is None:
            apply = partial(apply_h, ops, precision=self.precision)
            return _chebyshev(lambda r, d: r - apply(d), rhs, lam, f, self.num_iter)
        return _chebyshev_pallas(self, ops, rhs, lam, f)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ridge_solve(apply_h, solver, ops, lam, f, q):
    """x ≈ (H(ops) + λI)⁻¹ q row by row; x = q where f = 0 (no keys yet: nothing to whiten against).

    apply_h(ops, x) applies the symmetric PSD H (‖H‖₂ ≤ f) to every row of x. λ and f are [..., 1].
    """
    return _ridge_solve_fwd(apply_h, solver, ops, lam, f, q)[0]


def _ridge_solve_fwd(apply_h, solver, ops, lam, f, q):
    x = jnp.where(f > 0, solver(apply_h, ops, q, lam, f), q)
    return x, (ops, lam, f, x)


def _ridge_solve_bwd(apply_h, solver, res, dx):
    # x = A⁻¹q with A = H + λI symmetric: dq = A⁻¹dx, dA = −dq xᵀ, which reaches the operator's inputs as the
    # VJP of ops ↦ H(ops)x at −dq, and λ as −dq·x. f only sets the Chebyshev constants: the exact solution does
    # not depend on it (its true dependence on H is carried by λ = r·f outside this function).
    ops, lam, f, x = res
    dq = solver(apply_h, ops, dx, lam, f)  # 0 where f = 0 (_chebyshev)
    dops = jax.vjp(lambda o: apply_h(o, x), ops)[1](-dq)[0]
    dlam = -jnp.sum(dq * x, axis=-1, keepdims=True)
    return dops, dlam, jnp.zeros_like(f), jnp.where(f > 0, dq, dx)


_ridge_solve.defvjp(_ridge_solve_fwd, _ridge_solve_bwd)


def _apply_dense(h, x, precision=jax.lax.Precision.HIGHEST):
    """H x for an explicit state h [..., K, K] and rows x [..., K]."""
    return jnp.einsum("...jk,...k->...j", h, x, precision=precision)


def _apply_chunk(ops, x, precision=jax.lax.Precision.HIGHEST):
    """H_t x_t for every row of a chunk without forming H_t: e^{G_t} H₀x_t + Σ_s M[t,s] (k_s·x_t) k_s."""
    h0, decay, mask_decay, k = ops
    mm = partial(jnp.einsum, precision=precision)
    hx = mm("...jk,...ck->...cj", h0, x)
    xk = mm("...ck,...sk->...cs", x, k) * mask_decay
    return decay[..., None] * hx + mm("...cs,...sk->...ck", xk, k)


def _from_prefix(h0, prefix, k):
    """The kernels' chunk operators (h0, G, k) as _apply_chunk's: decay e^{G_t}, M[t,s] = e^{G_t − G_s} (s ≤ t),
    as the kernels form them on chip (from the prefix, not segment sums)."""
    return h0, jnp.exp(prefix), decay_matrix(prefix[..., :, None], prefix[..., None, :]), k


def _apply_prefix(ops, x, precision=jax.lax.Precision.HIGHEST):
    """_apply_chunk on the kernels' operators (h0, G, k): what their products compute."""
    return _apply_chunk(_from_prefix(*ops), x, precision)


def _chebyshev_kernel(h0_ref, gc_ref, gr_ref, k_ref, rhs_ref, lam_ref, f_ref, x_ref, *, num_iter, precision):
    """Row block j of a chunk (rhs_ref's rows; all rows, or blocks of the grid's second axis), one static branch
    per block. Its rows t ≥ r0 = j·rows see the keys before r0 only through the state just before row r0,
    H' = e^{G_r0} H₀ + Σ_{s<r0} M[r0,s] k_s k_sᵀ, decayed by M[t,r0] (M[t,s] = M[t,r0] M[r0,s] for s ≤ r0 ≤ t), so
    every block's solve runs against its own `rows` keys: at two blocks of 32 rows, half the key products of each
    iteration, for one [K, r0] × [r0, K] product per program (H200, T = 32768, 30 iterations: 7.00 ms against
    8.12 with the whole chunk's keys, 7.41 with the keys s ≤ t of each block)."""
    rows, c = rhs_ref.shape[0], k_ref.shape[0]
    block = partial(_chebyshev_block, h0_ref, gc_ref, gr_ref, k_ref, rhs_ref, lam_ref, f_ref, x_ref,
                    num_iter=num_iter, precision=precision)
    if rows == c:
        return block(start=0)
    for j in range(c // rows):
        pl.when(pl.program_id(1) == j)(partial(block, start=j * rows))


def _block_operator(h0_ref, gc_ref, gr_ref, k_ref, start, precision):
    """The chunk operator of rows start… (gc_ref's rows of G) on their own keys: (H', decay, mask, keys) as in
    _chebyshev_kernel, the decays formed from G. The keys' product is float32-accurate enough to stand for H₀
    (BF16X3 on Triton)."""
    rows, gc = gc_ref.shape[0], gc_ref[...]
    mask, k = decay_matrix(gc, gr_ref[:, start:start + rows]), k_ref[start:start + rows, :]
    if start == 0:
        return h0_ref[...], jnp.exp(gc), mask, k
    n = min(gr_ref.shape[1], pow2_at_least(start))  # the keys before r0 (Triton's blocks: powers of two)
    g0 = gr_ref[:, start:start + 1]  # G_r0
    before = jax.lax.broadcasted_iota(jnp.int32, (1, n), 1) < start
    w = _flip(jnp.exp(jnp.where(before, g0 - gr_ref[:, :n], -jnp.inf)))  # M[r0, s] for s < r0
    keys = k_ref[:n, :]
    # In fp16 (one pass) GKA's bf16 output error went 2.8e-3 → 3.0e-3, dg 1.6e-3 → 2.2e-3 (CPU), for no time.
    prefix = dot(w * keys.astype(jnp.float32), keys, ta=True, precision=BF16X3 if precision == F16 else precision)
    return jnp.exp(g0) * h0_ref[...] + prefix, jnp.exp(gc - g0), mask, k


def _chebyshev_block(h0_ref, gc_ref, gr_ref, k_ref, rhs_ref, lam_ref, f_ref, x_ref, *, start, num_iter,
                     precision):
    """One row block's Chebyshev solve (_block_operator) with everything on chip for all iterations.

    precision from _products: F16 (Triton, bf16 keys): fp16 products (_fp16_operator). BF16X3 (Triton, float32
    keys): H₀ split once per program, ~16 significant bits (GKA's float32 output error ≤ 6.2e-5 against the
    reference at the same num_iter in the CPU tests, products emulated, and ≤ 8.9e-5 in the H100 device tests; in
    the x-form of _chebyshev 1–3e-4 on a CPU, against 6–11e-6 with float32 products and 1–2e-2 with TF32). Mosaic:
    float32-accurate products.
    """
    h0, decay, mask, k = _block_operator(h0_ref, gc_ref, gr_ref, k_ref, start, precision)
    rhs, lam, f = rhs_ref[...].astype(jnp.float32), lam_ref[...], f_ref[...]
    if precision == F16:
        residual, first, row_scale = _fp16_operator(h0, decay, mask, k, rhs, lam)
        x_ref[...] = _chebyshev(residual, row_scale * rhs, lam, f, num_iter, first) / row_scale
        return
    if precision == BF16X3:
        h0 = split16(h0)
    else:
        k = k.astype(jnp.float32)
    mm = partial(dot, precision=precision)

    def residual(r, x):
        xk = mm(x, k, tb=True) * mask
        return r - decay * mm(x, h0) - mm(xk, k)

    x_ref[...] = _chebyshev(residual, rhs, lam, f, num_iter)


# The iterate's rows are solved scaled by ITERATE_SCALE·λ/‖q‖: as ‖x‖ ≤ ‖q‖/λ and ≥ ‖q‖/(λ + f) = ‖q‖/(51 λ) at
# r = 0.02, their norms stay within ~[5, 512] whatever the inputs' scale, inside fp16's range with room to spare;
# the updates that the products take are at most a few times ‖x‖ and shrink with the iteration's error.
ITERATE_SCALE = 256.0
# The fp16 solve's first products take the masked scores in two fp16 parts (_fp16_operator). In one part throughout,
# GKA's dk error on (2, 200, 2, 64, 64) went from 3.1e-3 to 7.5e-3; two parts for the first 5 products 4.9e-3, for
# the first 10 or for all 3.1e-3 (CPU, products emulated). At T = 32768 on an H100, GKA took 16.00 / 57.59 ms
# fwd / fwd+bwd with one part throughout against 16.63 / 58.87 with two, side by side, and two for the first 10
# timed as one throughout (15.83 / 57.21 against 15.91 / 57.33, on another machine).
TWO_PART_SCORES = 10


def _fp16_operator(h0, decay, mask, k, rhs, lam):
    """The chunk operator on fp16 tensor-core passes (Triton, bf16 keys) as _chebyshev's (residual, first), and the
    per-row scale of the solve.

    fp16 has 3 more significant bits than bf16 at the same speed, in a narrower range, so everything is scaled
    into it: keys by a power of two (exactly: 8-bit bf16 values fit fp16's 11), H₀ by 1/max|H₀|, each row of the
    iterate by ITERATE_SCALE·λ/‖q‖ (the solve is linear in q). Every operand is one fp16 part (3 passes per
    iteration), except the masked scores of the first TWO_PART_SCORES products, in two (4 passes). That holds GKA's
    errors only because _chebyshev multiplies its updates, not its iterate: in the x-form this operator needed the
    iterate and the scores in two parts at every iteration (6 passes)."""
    f16 = jnp.float16
    k16, sigma = scaled_f16(k, target=1.0)  # max|k σ| ≤ 1 bounds the scores' magnitude
    h_max = tile_max(jnp.abs(h0))
    h16 = (h0 / jnp.where(h_max > 0, h_max, 1)).astype(f16)
    h_weight, k_weight = decay * h_max, 1 / (sigma * sigma)
    q_norm = jnp.sqrt(jnp.sum(rhs * rhs, axis=1, keepdims=True))
    scalable = (lam > 0) & (q_norm > 0)
    row_scale = jnp.where(scalable, ITERATE_SCALE * lam / jnp.where(scalable, q_norm, 1), 1)

    def operator(score_parts):
        def residual(r, x):
            x16 = x.astype(f16)
            scores = dot(x16, k16, tb=True) * mask
            scores = split16(scores, f16) if score_parts == 2 else scores.astype(f16)
            return r - h_weight * dot(x16, h16) - k_weight * dot(scores, k16, precision=BF16X3)
        return residual

    return operator(1), (operator(2), TWO_PART_SCORES), row_scale


def _products(keys_exact):
    """Backend.precision's level for GKA's per-chunk kernels: F16 for bf16 inputs (keys exact in fp16), BF16X3 for
    float32 ones."""
    return F16 if keys_exact else BF16X3


def _chunk_spec(*shape):
    return pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))


def _chunk_operands(backend, keys_exact, h0, prefix, k):
    """GKA's chunk operators (h0 [..., K, K], the in-chunk prefix G [..., C], k [..., C, K]) as kernel inputs, one
    chunk per leading index: h0, G as a column and as a row (the kernels form e^G and M on chip, so no [C, C] array
    passes through XLA), k; K padded to the backend's width (keys as bf16 when they hold bf16 values)."""
    c, dk = k.shape[-2:]
    kp = backend.width(dk)
    flat = lambda x, *tail: x.reshape(-1, *tail)
    h0 = pad_axis(pad_axis(flat(h0, dk, dk).astype(jnp.float32), -1, kp), -2, kp)
    prefix = prefix.astype(jnp.float32)
    return (h0, flat(prefix, c, 1), flat(prefix, 1, c),
            pad_axis(flat(k, c, dk), -1, kp).astype(jnp.bfloat16 if keys_exact else jnp.float32))


def _chunk_rows(args, dk, *rows):
    """Row inputs [..., C, K or 1] of the per-chunk kernels as [chunks, C, ·] float32, K padded like the keys."""
    n, (c, kp) = args[0].shape[0], args[3].shape[1:]
    return [pad_axis(r.reshape(n, c, r.shape[-1]).astype(jnp.float32), -1, kp if r.shape[-1] == dk else 1)
            for r in rows]


def _chebyshev_pallas(solver, ops, rhs, lam, f):
    """The chunk operator's solve as a Pallas kernel: solver.block_rows rows of a chunk per program (rows are
    independent; M is causal). ops as for _apply_prefix, (h0, G, k) with leading axes [..., C, ...]; the Triton
    variant pads K to a power of two (zero columns solve to zero)."""
    backend = solver.backend
    args = _chunk_operands(backend, solver.keys_exact, *ops)
    rows = _chunk_rows(args, rhs.shape[-1], rhs, lam, f)
    c = rhs.shape[-2]
    block_rows = solver.block_rows if c % solver.block_rows == 0 else c
    if backend.name == "triton" and block_rows < 16:
        raise ValueError(f"gka: the Triton solve takes at least 16 rows per program, got block_rows={block_rows} "
                         f"(chunk_size {c})")
    whole = lambda a: pl.BlockSpec((None, *a.shape[1:]), lambda i, j: (i,) + (0,) * (a.ndim - 1))
    block = lambda a: pl.BlockSpec((None, block_rows, a.shape[-1]), lambda i, j: (i, j, 0))
    h0, gc, gr, k = args
    precision = backend.precision(_products(solver.keys_exact))
    kernel = partial(_chebyshev_kernel, num_iter=solver.num_iter, precision=precision)
    x = backend.call(kernel, grid=(h0.shape[0], c // block_rows),
                     in_specs=[whole(h0), block(gc), whole(gr), whole(k)] + [block(r) for r in rows],
                     out_specs=block(rows[0]), out_shape=jax.ShapeDtypeStruct(rows[0].shape, jnp.float32),
                     semantics=("parallel", "parallel"), num_warps=solver.num_warps, name="gka_chebyshev")(*args, *rows)
    return x[..., :rhs.shape[-1]].reshape(rhs.shape)


def _token_update(q, k, v, alpha, g, h_kk, h_kv, scale, ridge_strength, num_iter):
    """One token of GKA in solver precision: q, k [..., K], v [..., V], alpha, g [...]."""
    a = jnp.exp(g)[..., None, None]
    h_kk = a * h_kk + k[..., :, None] * k[..., None, :]
    h_kv = a * h_kv + k[..., :, None] * v[..., None, :]
    f = _safe_sqrt(jnp.sum(h_kk * h_kk, axis=(-2, -1)))[..., None]
    x = _ridge_solve(_apply_dense, Solver(num_iter), h_kk, ridge_strength * f, f, q)
    q_tilde = q + alpha[..., None] * (x - q)
    o = scale * einsum("...k,...kv->...v", q_tilde, h_kv)
    return o, h_kk, h_kv


def _reference(q, k, v, alpha, g, h_kk, h_kv, scale, ridge_strength, num_iter):
    """Token-by-token recurrence with explicit H_t: the definition the chunked form is tested against."""
    step = partial(_token_update, scale=scale, ridge_strength=ridge_strength, num_iter=num_iter)

    def body(carry, xs):
        o, h_kk, h_kv = step(*xs, *carry)
        return (h_kk, h_kv), o

    xs = tuple(jnp.moveaxis(t, 1, 0) for t in (q, k, v, alpha, g))
    (h_kk, h_kv), o = jax.lax.scan(body, (h_kk, h_kv), xs)
    return jnp.moveaxis(o, 0, 1), (h_kk, h_kv)


def _chunk_start_states(k, prefix, to_end, h_kk):
    """H₀ of every chunk (and the final H) by one sequential pass: H ← e^{G_C} H + Σ_s e^{G_C − G_s} k_s k_sᵀ."""
    local = einsum("bnhsj,bnhs,bnhsk->bnhjk", k, to_end, k)

    def body(h, xs):
        d, loc = xs
        return d[..., None, None] * h + loc, h

    xs = (jnp.moveaxis(jnp.exp(prefix[..., -1]), 1, 0), jnp.moveaxis(local, 1, 0))
    h_final, h0 = jax.lax.scan(body, h_kk, xs)
    return jnp.moveaxis(h0, 0, 1), h_final


def _chunk_frobenius(h0, decay, mask_decay, k):
    """‖H_t‖_F for every row of a chunk from H₀ and the chunk's keys (SPEC §5 expansion; all terms ≥ 0)."""
    h0_sq = jnp.sum(h0 * h0, axis=(-2, -1))[..., None]
    khk = einsum("...sj,...jk,...sk->...s", k, h0, k)
    kk = einsum("...sk,...uk->...su", k, k)
    pairs = einsum("...ts,...su->...tu", mask_decay, kk * kk) * mask_decay
    # Row sums as a matvec, not a reduce: XLA:CPU (jax 0.10) fuses dot -> multiply -> reduce into one YNN kernel
    # that returns wrong sums for some chunk sizes (192 and 256 seen; 64, 128, 384, 512 fine).
    within = einsum("...tu,u->...t", pairs, jnp.ones(pairs.shape[-1], pairs.dtype))
    f2 = decay**2 * h0_sq + 2 * decay * einsum("...ts,...s->...t", mask_decay, khk) + within
    return _safe_sqrt(f2)


def _flip(x):
    """A [C, 1] column as a [1, C] row or back, without a transpose (an identity mask and a sum lower everywhere)."""
    c = max(x.shape)
    eye = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0) == jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return jnp.sum(jnp.where(eye, x, 0), axis=0 if x.shape[1] == 1 else 1, keepdims=True)


def _frobenius_terms(h0, decay, mask, k, precision):
    """In-kernel pieces of _chunk_frobenius for one chunk: ‖H_t‖_F² [C, 1] and what its VJP reuses (with k, H₀ and
    M as product operands, converted once). Products with a vector are elementwise sums, not [C, C] × [C, K]
    matmuls."""
    mm = partial(dot, precision=precision)
    k32, ko, ho, mo = k.astype(jnp.float32), operand(k, precision), operand(h0, precision), operand(mask, precision)
    kh = mm(ko, ho)  # rows k_s H₀
    c = jnp.sum(kh * k32, axis=1, keepdims=True)  # k_sᵀ H₀ k_s
    c_row = _flip(c)
    kk = mm(ko, ko, tb=True)
    mw = mm(mo, kk * kk)  # Σ_s M[t,s] (k_s·k_u)²
    mc = jnp.sum(mask * c_row, axis=1, keepdims=True)  # Σ_s M[t,s] k_sᵀ H₀ k_s
    h0_sq = tile_sum(h0 * h0)
    f2 = decay * decay * h0_sq + 2 * decay * mc + jnp.sum(mw * mask, axis=1, keepdims=True)
    return f2, (k32, kh, c, c_row, kk, mw, mc, h0_sq, ko, ho, mo)


def _chunk_decays(gc_ref, gr_ref):
    """A chunk's decays e^{G_t} [C, 1] and M [C, C] from its prefix G (column and row refs)."""
    gc = gc_ref[...]
    return jnp.exp(gc), decay_matrix(gc, gr_ref[...])


def _frobenius_fwd_kernel(h0_ref, gc_ref, gr_ref, k_ref, f_ref, *, precision):
    f2, _ = _frobenius_terms(h0_ref[...], *_chunk_decays(gc_ref, gr_ref), k_ref[...], precision)
    f_ref[...] = _safe_sqrt(f2)


def _frobenius_weights(df, f, decay, mask):
    """df2 = df / 2f (0 where f = 0) and w = Mᵀ(2 df2 ∘ d) as a column: the weights of ‖H_t‖_F's VJP."""
    pos = f > 0
    df2 = jnp.where(pos, df / (2 * jnp.where(pos, f, 1)), 0)
    return df2, _flip(jnp.sum(mask * (2 * df2 * decay), axis=0, keepdims=True))


def _frobenius_bwd_kernel(h0_ref, gc_ref, gr_ref, k_ref, f_ref, df_ref, dg_ref, dk_ref, *, precision):
    """The VJP of _frobenius_terms' f = √f2, but for dH₀ (which _operator_vjp_kernel adds). With
    f2_t = d_t²‖H₀‖² + 2 d_t Σ_s M[t,s] c_s + Σ_{s,u} M[t,s] W[s,u] M[t,u], c_s = k_sᵀH₀k_s, W = (K Kᵀ)∘(K Kᵀ),
    d = e^G, df2 = df / 2f, v = 2 df2 ∘ d and w = Mᵀv: dH₀ = 2 (Σ_t df2_t d_t²) H₀ + Kᵀ diag(w) K,
    dK = diag(w) K (H₀ + H₀ᵀ) + 4 (K Kᵀ ∘ Mᵀ diag(df2) M) K, and dG = dd ∘ d + rowsum(P) − colsum(P) with
    dd_t = df2_t (2 d_t‖H₀‖² + 2 Σ_s M[t,s] c_s), P = dM ∘ M and dM = v cᵀ + 2 diag(df2) M W. The sums close
    without forming P: dd_t d_t + rowsum(P)_t = 2 df2_t f2_t = df_t f_t, and
    colsum(P)_s = c_s w_s + 2 Σ_u W[s,u] (Mᵀ diag(df2) M)[s,u]."""
    mm = partial(dot, precision=precision)
    (decay, mask), h0, k, f, df = _chunk_decays(gc_ref, gr_ref), h0_ref[...], k_ref[...], f_ref[...], df_ref[...]
    _, (k32, kh, c, c_row, kk, mw, mc, h0_sq, ko, ho, mo) = _frobenius_terms(h0, decay, mask, k, precision)
    df2, w = _frobenius_weights(df, f, decay, mask)
    d_kk = 2 * kk * mm(mo, df2 * mask, ta=True)
    dk_ref[...] = w * (kh + mm(ko, ho, tb=True)) + 2 * mm(d_kk, ko)
    dg_ref[...] = df * f - c * w - jnp.sum(kk * d_kk, axis=1, keepdims=True)


def _operator_vjp_kernel(h0_ref, gc_ref, gr_ref, k_ref, x_ref, dq_ref, f_ref, dh0_ref, dg_ref, dk_ref, dlam_ref,
                         *, ridge, precision):
    """The solve's implicit backward for _apply_prefix's rows x (_operator_grads), with y = −dq and
    out = decay ∘ (X H₀ᵀ) + ((X Kᵀ) ∘ M) K: dH₀ = (decay ∘ Y)ᵀ X, d decay = rowsum(Y ∘ X H₀ᵀ),
    dM = (X Kᵀ) ∘ (Y Kᵀ), dK = ((X Kᵀ) ∘ M)ᵀ Y + ((Y Kᵀ) ∘ M)ᵀ X, and dλ = rowsum(Y ∘ X). G enters through
    decay = e^G and M[t,s] = e^{G_t − G_s}: dG = d decay ∘ decay + rowsum(P) − colsum(P) with P = dM ∘ M.
    dH₀ also takes ‖H_t‖_F's share through λ = ridge·f (df = ridge·dλ; _frobenius_bwd_kernel has the rest):
    2 (Σ_t df2_t d_t²) H₀ + Kᵀ diag(w) K with df2 = df / 2f and w = Mᵀ(2 df2 ∘ d)."""
    mm = partial(dot, precision=precision)
    (decay, mask), h0, k, x, f = _chunk_decays(gc_ref, gr_ref), h0_ref[...], k_ref[...], x_ref[...], f_ref[...]
    y = -dq_ref[...]
    dlam = jnp.sum(y * x, axis=1, keepdims=True)
    dlam_ref[...] = dlam
    df2, w = _frobenius_weights(ridge * dlam, f, decay, mask)
    # The scores take x and y in two parts under F16 (in one, GKA's dg error went 1.7e-3 → 4.2e-3); their other
    # products take the high part (what one part would be).
    x2, y2 = (scaled_f16(a, parts=2) if precision == F16 else operand(a, precision) for a in (x, y))
    xo, yo = ((a[0][0], a[1]) if precision == F16 else a for a in (x2, y2))
    ko = operand(k, precision)
    dh0_ref[...] = (mm(decay * y, xo, ta=True) + mm(w * k.astype(jnp.float32), ko, ta=True)
                    + 2 * tile_sum(df2 * decay * decay) * h0)
    ddecay = jnp.sum(y * mm(xo, operand(h0, precision), tb=True), axis=1, keepdims=True)
    xk, yk = mm(x2, ko, tb=True), mm(y2, ko, tb=True)
    xkm, ykm = xk * mask, yk * mask
    p = xkm * yk  # dM ∘ M
    dg_ref[...] = decay * ddecay + jnp.sum(p, axis=1, keepdims=True) - _flip(jnp.sum(p, axis=0, keepdims=True))
    dk_ref[...] = mm(xkm, yo, ta=True) + mm(ykm, xo, ta=True)


def _per_chunk(backend, kernel, name, ops, keys_exact, rows, out_shapes, num_warps=4, level=BF16X3):
    """One program per chunk of `kernel` (products at Backend.precision(level)) on the chunk operators and row
    inputs [..., C, K or 1]: returns its float32 outputs [chunks, *shape] for out_shapes given as functions of
    (C, K')."""
    args = _chunk_operands(backend, keys_exact, *ops)
    rows = _chunk_rows(args, ops[-1].shape[-1], *rows)
    n, (c, kp) = args[0].shape[0], args[3].shape[1:]
    shapes = [shape(c, kp) for shape in out_shapes]
    return backend.call(partial(kernel, precision=backend.precision(level)), grid=(n,), num_warps=num_warps,
                        in_specs=[_chunk_spec(*a.shape[1:]) for a in (*args, *rows)],
                        out_specs=[_chunk_spec(*s) for s in shapes],
                        out_shape=[jax.ShapeDtypeStruct((n, *s), jnp.float32) for s in shapes],
                        semantics=("parallel",), name=name)(*args, *rows)


def _chunk_grads(backend, kernel, name, ops, keys_exact, *rows, h0_grad=True, row_outputs=0):
    """Run a per-chunk VJP kernel (_per_chunk) on the operators (h0, G, k); returns their cotangents in their
    shapes and dtypes (dh0 None unless h0_grad), then the kernel's row_outputs further outputs [..., C, 1]. bf16
    inputs (keys_exact): fp16 products (F16). GKA at T = 32768 on an H100: fwd+bwd 64.82 / 65.06 ms against
    67.00 / 67.05 with bf16x3, side by side; the device tests' bf16 gradient errors moved by ≤ 1.3e-4 (dg up to
    3.3e-4, the gradients' worst 3.3e-3 as before)."""
    # 8 warps: the [K, K] float32 cotangent of H₀ is half the registers per thread (H100, T = 8192: the operator's
    # VJP 1.46 ms vs 2.07 at 4 warps, 4.22 at 16, XLA 1.85). ‖H_t‖_F's VJP, without one, at 4 warps: GKA's fwd+bwd
    # 35.86 against 33.12 ms (H200, T = 32768).
    shapes = ((lambda c, kp: (kp, kp)),) if h0_grad else ()
    shapes += (lambda c, kp: (c, 1), lambda c, kp: (c, kp)) + (lambda c, kp: (c, 1),) * row_outputs
    grads = _per_chunk(backend, kernel, name, ops, keys_exact, rows, shapes, num_warps=8,
                       level=_products(keys_exact))
    dh0, (dprefix, dk, *rest) = (grads[0], grads[1:]) if h0_grad else (None, grads)
    h0, prefix, k = ops
    dh0 = None if dh0 is None else dh0[:, :h0.shape[-1], :h0.shape[-1]].reshape(h0.shape)
    return (dh0, dprefix.reshape(prefix.shape).astype(prefix.dtype),
            dk[..., :k.shape[-1]].reshape(k.shape).astype(k.dtype), *(g.reshape(*prefix.shape, 1) for g in rest))


def _frobenius(backend, keys_exact, ops):
    """_chunk_frobenius on the kernels' operators (h0 [..., K, K], the prefix G [..., C], k [..., C, K];
    _from_prefix) as a Pallas kernel per chunk: f [..., C, 1]. keys_exact: k holds bf16 values (read as bf16)."""
    (f,) = _per_chunk(backend, _frobenius_fwd_kernel, "gka_frobenius", ops, keys_exact, (), [lambda c, kp: (c, 1)])
    return f.reshape(*ops[2].shape[:-1], 1)


def _operator_grads(solver, ridge, ops, f, x, dq):
    """The chunk operators' cotangents from the implicit backward of x = (H_t + λ_t I)⁻¹q (dA = −dq xᵀ, and
    dλ = −dq·x into λ = ridge·f, f = ‖H_t‖_F), by the two VJP kernels: the operator's, which adds ‖H_t‖_F's dH₀
    (one [K, K] cotangent written, none summed in XLA), then ‖H_t‖_F's for dG and dk."""
    backend, keys_exact = solver.backend, solver.keys_exact
    dh0, dg, dk, dlam = _chunk_grads(backend, partial(_operator_vjp_kernel, ridge=ridge), "gka_operator_vjp", ops,
                                     keys_exact, x, dq, f, row_outputs=1)
    _, dg_f, dk_f = _chunk_grads(backend, _frobenius_bwd_kernel, "gka_frobenius_bwd", ops, keys_exact, f,
                                 ridge * dlam, h0_grad=False)
    return dh0, dg + dg_f, dk + dk_f


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_solve(solver, ridge, h0, prefix, k, q):
    """_ridge_solve with λ = ridge·‖H_t‖_F on the kernels' chunk operators (h0, G, k) and rows q [..., C, K]: one
    custom VJP for ‖H_t‖_F and the solve, so that their [K, K] cotangents of H₀ meet in one kernel."""
    return _kernel_solve_fwd(solver, ridge, h0, prefix, k, q)[0]


def _kernel_solve_fwd(solver, ridge, h0, prefix, k, q):
    ops = (h0, prefix, k)
    f = _frobenius(solver.backend, solver.keys_exact, ops)
    x = jnp.where(f > 0, solver(_apply_prefix, ops, q, ridge * f, f), q)
    return x, (ops, f, x)


def _kernel_solve_bwd(solver, ridge, res, dx):
    ops, f, x = res
    dq = solver(_apply_prefix, ops, dx, ridge * f, f)  # 0 where f = 0 (_chebyshev)
    return (*_operator_grads(solver, ridge, ops, f, x, dq), jnp.where(f > 0, dq, dx))


_kernel_solve.defvjp(_kernel_solve_fwd, _kernel_solve_bwd)


def _chunked_solve(q, k, g, h_kk, ridge_strength, num_iter, chunk_size):
    """x_t ≈ (H_t + λ_t I)⁻¹ q_t for all tokens ([B, T, H, K]) and the final H, chunk by chunk."""
    t = q.shape[1]
    q, k, g = (to_chunks(x, chunk_size) for x in (q, k, g))  # [B, N, H, C, ...]; padding has g = 0, k = q = 0
    prefix, mask_decay = chunk_decay(g)
    h0, h_final = _chunk_start_states(k, prefix, mask_decay[..., -1, :], h_kk)
    decay = jnp.exp(prefix)
    f = _chunk_frobenius(h0, decay, mask_decay, k)[..., None]
    x = _ridge_solve(_apply_chunk, Solver(num_iter), (h0, decay, mask_decay, k), ridge_strength * f, f, q)
    return from_chunks(x, t), h_final


def _pallas_solve(backend, q, k, g, h_kk, ridge_strength, num_iter, chunk_size, keys_exact):
    """_chunked_solve on the Pallas kernels: H₀ of every chunk from chunk_scan (values = keys), then one
    Chebyshev kernel program per chunk, forward and for the implicit backward solve."""
    b, t, h, dk = q.shape
    check_pallas_chunk("gka", chunk_size)
    # float32 q and k (not only float32 accumulation): the gradient contributions of k's several paths would
    # otherwise be rounded to bf16 before they are summed, and they partly cancel (measured on a CPU, bf16 inputs:
    # GKA's dk 1.1e-2 relative error with bf16 operands, 6.3e-3 with float32).
    q, k, g = (to_head_chunks(x.astype(jnp.float32), chunk_size) for x in (q, k, g))
    prefix = jnp.cumsum(g, axis=-1)
    h_kk = h_kk.astype(jnp.float32).reshape(b * h, dk, dk)
    to_end = jnp.exp(prefix[..., -1:] - prefix)  # e^{G_C − G_s}
    h0, h_final = scan(backend, to_end[..., None] * k, k, jnp.exp(prefix[..., -1]), h_kk, ScanConfig(exact=BF16X3))
    x = _kernel_solve(Solver(num_iter, backend, keys_exact=keys_exact), ridge_strength, h0, prefix, k, q)
    return from_head_chunks(x, b, t), h_final.reshape(b, h, dk, dk)


def _check_common(op, q, k, v, alpha, g, state, num_iter):
    """Shape checks shared by gka and gka_step; returns the state as (h_kk or None, h_kv or None)."""
    if state is None:
        h_kk = h_kv = None
    elif isinstance(state, (tuple, list)) and len(state) == 2:
        h_kk, h_kv = state
    else:
        raise ValueError(f"{op}: state must be None or a pair (h_kk, h_kv)")
    check_qkv(op, q, k, v, {"alpha": alpha, "g": g}, h_kv, step=op == "gka_step")
    if h_kk is not None:
        want = (q.shape[0], q.shape[-2], q.shape[-1], q.shape[-1])
        if h_kk.shape != want:
            raise ValueError(f"{op}: h_kk has shape {h_kk.shape}; expected {want} ([B, H, K, K])")
    if not isinstance(num_iter, int) or num_iter < 0:
        raise ValueError(f"{op}: num_iter must be a non-negative int, got {num_iter!r}")
    return h_kk, h_kv


def _state_or_zeros(h_kk, h_kv, q, v, dtype):
    b, dk, dv, h = q.shape[0], q.shape[-1], v.shape[-1], q.shape[-2]
    h_kk = jnp.zeros((b, h, dk, dk), dtype) if h_kk is None else h_kk.astype(dtype)
    h_kv = jnp.zeros((b, h, dk, dv), dtype) if h_kv is None else h_kv.astype(dtype)
    return h_kk, h_kv


def gka(q, k, v, alpha, g, *, scale=None, ridge_strength=0.02, num_iter=30, initial_state=None,
        output_final_state=False, chunk_size=64, impl="auto"):
    """Gated KalmaNet attention over a sequence.

    Args:
      q, k: [B, T, H, K], already L2-normalized (k also β-scaled). v: [B, T, H, V], β-scaled.
      alpha: [B, T, H] in [0, 1], how far the query moves toward the whitened x_t.
      g: [B, T, H] log decay (≤ 0) shared by both states.
      scale: read-out scale, default K^-1/2.
      ridge_strength: r in λ_t = r·‖H_t‖_F.
      num_iter: Chebyshev iterations (30 ≈ 2e-4 relative solve error, 10 ≈ 6e-2).
      initial_state: None or (h_kk [B, H, K, K] symmetric PSD, h_kv [B, H, K, V]).
      chunk_size: tokens per chunk of the chunked form; T need not be a multiple of it.
      impl: "reference" (token-by-token scan, for tests), "chunked" (XLA), "pallas" (this platform's kernels,
        interpreted on a CPU), "pallas_triton" / "pallas_mosaic", "auto" (Pallas on GPUs, chunked elsewhere).

    Returns:
      (o [B, T, H, V] in v's dtype, (h_kk, h_kv) final states in fp32 (float64 for float64 inputs),
      or None unless output_final_state).

    Reverse mode only (the solve is a custom_vjp). The h_kk cotangent is the plain-matrix gradient; its symmetric
    part is the gradient within symmetric states. In float32, o carries rounding of about ε·max|x|·‖h_kv‖ since
    x ≈ q/λ is large where no recent key points (measured up to ~1e-4 of max|o| with a single key, ~2e-5 typical).
    """
    h_kk, h_kv = _check_common("gka", q, k, v, alpha, g, initial_state, num_iter)
    if chunk_size < 1:
        raise ValueError(f"gka: chunk_size must be positive, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype, out_dtype = acc_dtype(q, k, v), v.dtype
    impl = resolve_impl("gka", impl, dtype)
    h_kk, h_kv = _state_or_zeros(h_kk, h_kv, q, v, dtype)
    # One cast for every use: k feeds four paths whose gradients partly cancel; summed in float32 first.
    # bf16 inputs: the solve's keys (and the read-out's keys and values) are exact in one bf16 part.
    keys_exact, bf16_values = k.dtype == jnp.bfloat16, k.dtype == v.dtype == jnp.bfloat16
    q, k, v, alpha, g = (x.astype(dtype) for x in (q, k, v, alpha, g))
    if impl.startswith("pallas"):
        backend = backend_for(impl[7:])
        x, h_kk = _pallas_solve(backend, q, k, g, h_kk, ridge_strength, num_iter, chunk_size, keys_exact)
        q_tilde = q + alpha[..., None] * (x - q)
        o, h_kv = simple_gla_pallas(backend, q_tilde, k, v, g, h_kv, scale, chunk_size, exact=BF16X3,
                                    bf16_values=bf16_values)
    elif impl == "reference":
        o, (h_kk, h_kv) = _reference(q, k, v, alpha, g, h_kk, h_kv, scale, ridge_strength, num_iter)
    else:
        x, h_kk = _chunked_solve(q, k, g, h_kk, ridge_strength, num_iter, chunk_size)
        q_tilde = q + alpha[..., None] * (x - q)
        o, h_kv = simple_gla(q_tilde, k, v, g, scale=scale, initial_state=h_kv, output_final_state=True,
                             chunk_size=chunk_size, impl="chunked")
    return o.astype(out_dtype), ((h_kk, h_kv) if output_final_state else None)


def gka_step(q, k, v, alpha, g, state, *, scale=None, ridge_strength=0.02, num_iter=30):
    """One decode token: q, k [B, H, K], v [B, H, V], alpha, g [B, H]; state (h_kk, h_kv) or None.

    Returns (o [B, H, V] in v's dtype, (h_kk, h_kv) in fp32, float64 for float64 inputs).
    """
    h_kk, h_kv = _check_common("gka_step", q, k, v, alpha, g, state, num_iter)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype, out_dtype = acc_dtype(q, k, v), v.dtype
    h_kk, h_kv = _state_or_zeros(h_kk, h_kv, q, v, dtype)
    q, k, v, alpha, g = (x.astype(dtype) for x in (q, k, v, alpha, g))
    o, h_kk, h_kv = _token_update(q, k, v, alpha, g, h_kk, h_kv, scale, ridge_strength, num_iter)
    return o.astype(out_dtype), (h_kk, h_kv)
