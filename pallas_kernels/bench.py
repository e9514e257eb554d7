"""Time the SSM ops: forward and forward+backward, jitted, median of repeats after a warm-up.

    python -m pallas_kernels.bench [--impl chunked] [--b 1 --t 4096 --h 4 --d 64] [--dtype float32]

Prints one row per op with the device and JAX version. The Pallas kernels and the peer comparisons of the
kernels issue will be added to this table; today it measures the chunked XLA forms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels import causal_conv1d, gated_delta_rule, gka, simple_gla


def inputs(b, t, h, d, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    normal = lambda k, *s: jax.random.normal(k, s, jnp.float32)
    l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k, v = l2(normal(keys[0], b, t, h, d)), l2(normal(keys[1], b, t, h, d)), normal(keys[2], b, t, h, d)
    g = -jax.nn.softplus(normal(keys[3], b, t, h)) * 0.1
    beta, alpha = jax.nn.sigmoid(normal(keys[4], b, t, h)), jax.nn.sigmoid(normal(keys[5], b, t, h))
    return [x.astype(dtype) for x in (q, k, v)] + [g, beta, alpha]


def ops(impl: str, num_iter: int):
    return {
        "simple_gla": lambda q, k, v, g, beta, alpha: simple_gla(q, k, v, g, impl=impl)[0],
        "gated_delta_rule": lambda q, k, v, g, beta, alpha: gated_delta_rule(q, k, v, g, beta, impl=impl)[0],
        f"gka ({num_iter} it)": lambda q, k, v, g, beta, alpha: gka(q, k, v, alpha, g, num_iter=num_iter,
                                                                    impl=impl)[0],
        "causal_conv1d": lambda q, k, v, g, beta, alpha: causal_conv1d(
            v.reshape(v.shape[0], v.shape[1], -1), jnp.ones((v.shape[2] * v.shape[3], 4), v.dtype))[0],
    }


def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="chunked")
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--t", type=int, default=4096)
    p.add_argument("--h", type=int, default=4)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-iter", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    x = inputs(args.b, args.t, args.h, args.d, jnp.dtype(args.dtype))
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, impl {args.impl}, "
          f"B={args.b} T={args.t} H={args.h} D={args.d} {args.dtype}")
    print("| op | fwd ms | fwd+bwd ms |\n|---|---|---|")
    for name, op in ops(args.impl, args.num_iter).items():
        fwd = jax.jit(op)
        loss = lambda *a, op=op: jnp.sum(op(*a).astype(jnp.float32) ** 2)
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        print(f"| {name} | {median_ms(fwd, x, args.repeats):.2f} | {median_ms(bwd, x, args.repeats):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
