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


@dataclasses.dataclass(frozen=True)
class Backend:
    """A kernel variant and whether it runs interpreted (hashable: it is a static argument of custom VJPs)."""

    name: str
    interpret: bool

    def precision(self, exact: bool | str):
        """Matmul precision for float32 operands: the default (exact False: TF32 on GPU tensor cores), or more
        accurate where rounding would be amplified: exact True, float32-accurate (three TF32 passes in a Triton
        kernel); "bf16x3", about 16 significant bits from three bf16 passes (bf16 tensor-core speed, half the shared
        memory of TF32 operands). Both are HIGHEST off Triton (and interpreted, where the CPU computes in float32)."""
        if not exact:
            return None
        if self.name == "triton" and not self.interpret:
            if exact == "bf16x3":
                return jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3
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


def dot(a, b, *, ta: bool = False, tb: bool = False, precision=None):
    """a @ b (aᵀ, bᵀ when ta, tb) with float32 accumulation; precision from Backend.precision."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


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
