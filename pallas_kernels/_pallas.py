"""What the Pallas kernels share: the backend choice, and matmuls with float32 accumulation.

Every kernel comes in two variants with one numerical body:
  "triton": Pallas on Triton for GPUs. One program per (head, block) loops over the chunks itself.
  "mosaic": Pallas Mosaic for TPUs. The chunk axis is an "arbitrary" grid axis; carried state lives in VMEM scratch.
On a CPU both run in interpret mode (the Mosaic one with TPU semantics), which is how CI checks them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BACKENDS = ("triton", "mosaic")
# Backend.precision's bf16x3 level on Triton: dot() splits float32 operands into bf16 hi/lo parts itself.
BF16X3 = "bf16x3"
# Its f16 level on Triton: dot() takes each operand as one fp16 part scaled into range (scaled_f16): 11 significant
# bits where one bf16 part has 8, in one pass.
F16 = "f16"


@dataclasses.dataclass(frozen=True)
class Backend:
    """A kernel variant and whether it runs interpreted (hashable: it is a static argument of custom VJPs)."""

    name: str
    interpret: bool

    def precision(self, exact: bool | str):
        """Matmul precision for float32 operands: the default (exact False: TF32 on GPU tensor cores), or more
        accurate where rounding would be amplified. exact True: float32-accurate (three TF32 passes in a Triton
        kernel, HIGHEST elsewhere). exact "bf16x3" on Triton: BF16X3, about 16 significant bits from bf16 hi/lo
        parts (see dot; bf16 tensor-core speed, half the shared memory of TF32 operands), emulated the same way when
        interpreted; HIGHEST on Mosaic. exact "f16" on Triton: F16 (see dot), emulated the same way when
        interpreted; HIGHEST on Mosaic (TPUs have no fp16 matmul)."""
        if not exact:
            return None
        if self.name == "triton" and exact in (BF16X3, F16):
            return exact
        if self.name == "triton" and not self.interpret:
            return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        return jax.lax.Precision.HIGHEST

    def width(self, n: int) -> int:
        """A kernel's size for a feature dimension of n: Triton blocks want powers of two ≥ 16 (zero-padded; zero
        columns stay zero), Mosaic takes n as it is."""
        return pow2_at_least(n) if self.name == "triton" else n

    def call(self, kernel, *, grid, in_specs, out_specs, out_shape, scratch_shapes=(), semantics=None,
             num_warps=4, num_stages=1, name=None):
        """pallas_call with this backend's compiler parameters and interpret mode."""
        if self.name == "mosaic":
            params = pltpu.CompilerParams(dimension_semantics=semantics)
            interpret = pltpu.InterpretParams() if self.interpret else False
        else:
            params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
            interpret = self.interpret
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              scratch_shapes=scratch_shapes, compiler_params=params, interpret=interpret,
                              name=name)


def backend_for(variant: str | None = None) -> Backend:
    """The kernel variant for this platform (GPU → triton, TPU → mosaic), interpreted anywhere else.

    variant forces one ("triton" or "mosaic"); off its platform it runs interpreted.
    """
    platform = jax.default_backend()
    native = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic"}.get(platform)
    name = variant or native or "triton"
    if name not in BACKENDS:
        raise ValueError(f"Pallas variant must be one of {BACKENDS}, got {name!r}")
    return Backend(name, interpret=name != native)


def split16(x, dtype=jnp.bfloat16):
    """x as (hi, lo) parts in a 16-bit float dtype with x ≈ hi + lo: ~16 significant bits in bf16, ~22 in fp16
    (whose range the caller must scale x into). A 16-bit x is exact in one part (lo None); a pair passes through
    (split once, use many times)."""
    if isinstance(x, tuple):
        return x
    if x.dtype in (jnp.bfloat16, jnp.float16):
        return x, None
    hi = x.astype(dtype)
    return hi, (x.astype(jnp.float32) - hi.astype(jnp.float32)).astype(dtype)


def scaled_f16(x, parts: int = 1, target: float = 2.0**14):
    """(x·s in fp16, one part or a split16 pair, and s [1, 1]): s the power of two that puts max|x| in
    (target/2, target]; the default leaves fp16's range 28 binades of full precision below it. bf16 values stay
    exact (8 of fp16's 11 bits)."""
    f32 = jnp.float32
    top = jnp.clip(tile_max(jnp.abs(x.astype(f32))), 2.0**-60, 2.0**60)
    # exp2 of an integer, rounded through bf16 so that it is a power of two exactly.
    s = jnp.exp2(jnp.floor(jnp.log2(target / top))).astype(jnp.bfloat16).astype(f32)
    # Clipped to fp16's finite range before the cast. Without it, Triton turns f16(f32(x)·s) for a bf16 x into an
    # fp16 product of f16(x) and f16(s), which overflows for s > 65504 and flushes x below 2^−14 (NaN in GKA's VJP
    # kernels on an H100 at C = 64, K = 128).
    x = jnp.clip(x.astype(f32) * s, -65504.0, 65504.0)
    return (split16(x, jnp.float16) if parts == 2 else x.astype(jnp.float16)), s


def dot(a, b, *, ta: bool = False, tb: bool = False, precision=None):
    """a @ b (aᵀ, bᵀ when ta, tb) with float32 accumulation; precision from Backend.precision.

    BF16X3: hi·hi + lo·hi + hi·lo over split16 parts (lo·lo dropped), so a product takes three bf16 passes, two
    when one operand is 16-bit and one when both are: operands keep their own dtypes (a or b may be a split pair,
    bf16 or fp16, the other operand of the same dtype). F16: one pass over scaled_f16 parts (an operand may be
    scaled_f16's (value, scale) with a pair for its value, which adds a pass).
    """
    if precision == F16:  # operands as they come from scaled_f16, or arrays that it converts here
        (a, sa), (b, sb) = (x if isinstance(x, tuple) else scaled_f16(x) for x in (a, b))
        return dot(a, b, ta=ta, tb=tb, precision=BF16X3) / (sa * sb)
    if precision == BF16X3:
        (a_hi, a_lo), (b_hi, b_lo) = split16(a), split16(b)
        out = dot(a_hi, b_hi, ta=ta, tb=tb)
        if a_lo is not None:
            out = out + dot(a_lo, b_hi, ta=ta, tb=tb)
        return out if b_lo is None else out + dot(a_hi, b_lo, ta=ta, tb=tb)
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def operand(x, precision):
    """x in dot's operand form at precision (scaled_f16's pair for F16, split16's for BF16X3), converted once for
    a tile that several products share: each conversion of a tile takes a max over it or a split."""
    if precision == F16:
        return scaled_f16(x)
    return split16(x) if precision == BF16X3 else x


def corrected_values(u, w, s, precision=None):
    """The gated delta rule's corrected values u − w S in float32, S rounded to w's dtype for the product. Its state
    pass forms them and its output kernel forms them again from the saved (rounded) states: both call this, so
    they agree."""
    return u.astype(jnp.float32) - dot(w, s.astype(w.dtype), precision=precision)


def tile_sum(x):
    """Sum of a 2-D tile as a (1, 1) tile (Mosaic reduces axis by axis)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def tile_max(x):
    """Largest element of a 2-D tile as a (1, 1) tile."""
    return jnp.max(jnp.max(x, axis=1, keepdims=True), axis=0, keepdims=True)


def grid_head(b, heads: int, own: int):
    """Triton grids over B·heads: program b's (batch, head) index into a token-major [B, N, C, own, ·] array,
    whose own ≤ heads heads are grouped (check_qkv: head h reads head h // (heads / own))."""
    return b // heads, (b % heads) // (heads // own)


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Triton blocks and tensor-core tiles want power-of-two sizes of at least 16."""
    return max(floor, 1 << (n - 1).bit_length())


def pad_axis(x, axis: int, size: int):
    """Zero-pad one axis of x up to size (no copy when it already fits)."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)
