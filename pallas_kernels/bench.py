"""Time the SSM ops side by side: our Pallas kernels, our chunked XLA form and the PyTorch/Triton peers.

    python -m pallas_kernels.bench                      # the kernels issue's shapes on this device, bf16
    python -m pallas_kernels.bench --shapes 1x4096x4x64 --dtype float32 --impls chunked   # a CPU-sized run
    python -m pallas_kernels.bench --shapes 1x8192x32x128 --components   # the kernels alone: find the bottleneck

Forward and forward+backward (gradient of Σ o·r w.r.t. every input), jitted, median of repeats after a warm-up;
each repeat times CALLS (10) calls launched back to back (device time, not the host's launch latency).
Peers, timed in the same run when they import: flash-linear-attention's chunk_gated_delta_rule and
chunk_simple_gla, and mamba_ssm's mamba_chunk_scan_combined (Mamba-2 SSD: 8 B/C groups, chunk 256) against our
simple_gla fed the same problem (B, C repeated to the heads, v = Δ·x, log decay Δ·A).

For our Pallas rows the table adds a FLOP and byte model (model_flops / model_bytes below, stated there), the
achieved TFLOP/s and TB/s, and the ratio of the time to its floor max(FLOPs / peak, bytes / bandwidth).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import causal_conv1d, gated_delta_rule, gka, simple_gla

PEAK_TFLOPS, PEAK_TBS = 800.0, 3.0  # H100 bf16 matmul through XLA and device copy bandwidth, measured (SPEC §11)
PAPER_SHAPES = ("1x8192x32x128", "1x32768x32x128", "4x2048x32x128")
# Calls per timing sample, launched back to back (median_ms, time_torch). With a sync after every call instead,
# flash-linear-attention's GDN forward at T = 32768 timed 2.7 ms on an H100 for 2.2 ms of kernels (torch profiler).
CALLS = 10


def model_flops(op: str, b, t, h, k, v, c=64, num_iter=30) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of the chunked algorithm, matmuls only, backward counted as 2× forward.

    simple_gla per token: Q Kᵀ and scores·V (2C(K+V)), Q·S and the state update (4KV).
    gated_delta_rule adds K Kᵀ, W = T·K, Ũ = T·V (2C(2K+V)), U = Ũ − W S (2KV) and the triangular inverse (C²/3).
    gka: the H pass (2K²), ‖H_t‖_F terms (2K² + 2CK + 2C²), num_iter Chebyshev steps of 2K² + 4CK, then simple_gla
    with V; its backward is one more solve plus 2× the rest.
    """
    gla = 2 * c * (k + v) + 4 * k * v
    if op == "simple_gla":
        fwd = gla
        total = 3 * fwd
    elif op == "gated_delta_rule":
        fwd = gla + 2 * c * (2 * k + v) + 2 * k * v + c * c / 3
        total = 3 * fwd
    else:
        solve = num_iter * (2 * k * k + 4 * c * k)
        rest = 4 * k * k + 2 * c * k + 2 * c * c + gla
        fwd = solve + rest
        total = 2 * solve + 3 * rest
    n = b * t * h
    return n * fwd, n * total


def model_bytes(op: str, b, t, h, k, v, itemsize: int) -> tuple[float, float]:
    """(forward, forward+backward) bytes every implementation must move: q, k, v and the gates in, o out;
    backward reads the inputs and do again and writes a gradient per input."""
    gates = {"simple_gla": 1, "gated_delta_rule": 2}.get(op, 2)
    inputs = b * t * h * ((2 * k + v) * itemsize + 4 * gates)
    out = b * t * h * v * itemsize
    return inputs + out, 3 * inputs + 2 * out


def inputs(b, t, h, d, dtype, seed=0):
    """L2-normalized q, k, unit-variance v, layer-like gates (log decay ≈ −0.07, β and α in (0, 1))."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = unit(rng.standard_normal((2, b, t, h, d), np.float32))
    v = rng.standard_normal((b, t, h, d), np.float32)
    g = -np.log1p(np.exp(rng.standard_normal((b, t, h), np.float32))) * 0.1
    beta, alpha = 1 / (1 + np.exp(-rng.standard_normal((2, b, t, h), np.float32)))
    return [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(x) for x in (g, beta, alpha)]


def ours(impl: str, num_iter: int):
    return {
        "simple_gla": lambda q, k, v, g, beta, alpha: simple_gla(q, k, v, g, impl=impl)[0],
        "gated_delta_rule": lambda q, k, v, g, beta, alpha: gated_delta_rule(q, k, v, g, beta, impl=impl)[0],
        "gka": lambda q, k, v, g, beta, alpha: gka(q, k, v, alpha, g, num_iter=num_iter, impl=impl)[0],
        "causal_conv1d": lambda q, k, v, g, beta, alpha: causal_conv1d(
            v.reshape(v.shape[0], v.shape[1], -1), jnp.ones((v.shape[2] * v.shape[3], 4), v.dtype))[0],
    }


def median_ms(fn, args, repeats: int) -> float:
    """Median over repeats of the time per call of CALLS back-to-back calls, synchronized once: the host
    dispatches ahead while the device works, as in triton's do_bench (SPEC §11's peer timings), so the figure is the
    device's time, not the host's launch latency."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(CALLS)])
        times.append((time.perf_counter() - t) / CALLS)
    return 1e3 * statistics.median(times)


def time_jax(op, x, repeats):
    r = jax.random.normal(jax.random.PRNGKey(1), jax.eval_shape(op, *x).shape, jnp.float32)
    fwd = jax.jit(op)
    loss = lambda r, *a: jnp.sum(op(*a).astype(jnp.float32) * r)  # r an argument: no constant folding
    bwd = jax.jit(jax.grad(loss, argnums=tuple(range(1, len(x) + 1))))
    return median_ms(fwd, x, repeats), median_ms(bwd, [r, *x], repeats)


def torch_peers():
    """{op: (peer name, fn(torch tensors...) -> o)} for the peers that import here."""
    peers = {}
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla

        # fla 0.6 refuses its gated backward on Hopper with Triton < 3.7.1 (a correctness issue, fla #640):
        # bypassed here for timing only, as SPEC §11 did.
        chunk_o.TRITON_ABOVE_3_7_1 = True
        peers["gated_delta_rule"] = ("flash-linear-attention chunk_gated_delta_rule",
                                     lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta)[0])
        peers["simple_gla"] = ("flash-linear-attention chunk_simple_gla",
                               lambda q, k, v, g, beta: chunk_simple_gla(q, k, v, g)[0])
    except Exception as e:  # noqa: BLE001 - a missing peer only drops its rows
        print(f"(flash-linear-attention not importable: {type(e).__name__}: {e})")
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        peers["ssd"] = ("mamba_ssm mamba_chunk_scan_combined",
                        lambda x, dt, a, bm, cm: mamba_chunk_scan_combined(x, dt, a, bm, cm, chunk_size=256))
    except Exception as e:  # noqa: BLE001
        print(f"(mamba_ssm not importable: {type(e).__name__}: {e})")
    return peers


def time_torch(fn, args, repeats):
    import torch

    def run(backward):
        out = fn(*args)
        if backward:
            out.backward(torch.ones_like(out))

    times = {}
    for backward in (False, True):
        run(backward)
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CALLS):  # back to back, as median_ms: a sync per call would time the host's launches
                run(backward)
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / CALLS)
        times[backward] = statistics.median(samples)
    return times[False], times[True]


def ssd_problem(b, t, h, d, groups=8, seed=0):
    """A Mamba-2 SSD problem as numpy: x [B,T,H,P], dt [B,T,H], A [H], B, C [B,T,G,N]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, h, d), np.float32)
    dt = np.log1p(np.exp(rng.standard_normal((b, t, h), np.float32) - 3))
    a = -np.exp(rng.uniform(0, 2, h)).astype(np.float32)
    bm, cm = rng.standard_normal((2, b, t, groups, d), np.float32) / np.sqrt(d)
    return x, dt, a, bm, cm


def ssd_through_simple_gla(x, dt, a, bm, cm, impl="pallas"):
    """Mamba-2's SSD as simple GLA: C, B the (grouped) queries and keys, x·dt the values, dt·A the log decay."""
    return simple_gla(cm, bm, x, dt * a, scale=1.0, chunk_size=64, impl=impl, v_scale=dt)[0]


def _wy_pallas(backend, k, v, beta, prefix):
    """wy_forward with wy_backward as its VJP (the op wraps them in a larger custom VJP)."""
    from pallas_kernels.wy import wy_backward, wy_forward

    @jax.custom_vjp
    def prep(k, v, beta, prefix):
        return tuple(wy_forward(backend, k, v, beta, prefix)[:2])

    def fwd(k, v, beta, prefix):
        w, u, t = wy_forward(backend, k, v, beta, prefix)
        return (w, u), (k, v, beta, prefix, t)

    def bwd(res, cts):
        k, v, beta, prefix, t = res
        return wy_backward(backend, k, v, beta, prefix, t, *cts, jnp.zeros_like(k))

    prep.defvjp(fwd, bwd)
    return prep(k, v, beta, prefix)


def _wy_xla(k, v, beta, prefix):
    """The WY preparation in float32 XLA (the gated delta rule's Pallas path before wy_forward)."""
    from pallas_kernels._common import lower_mask
    from pallas_kernels.gated_delta_rule import wy_terms

    strict = lower_mask(beta.shape[-1], strict=True)
    decay = jnp.exp(jnp.where(strict, prefix[..., :, None] - prefix[..., None, :], -jnp.inf))
    w, u = wy_terms(k.astype(jnp.float32), v.astype(jnp.float32), beta, jnp.exp(prefix), decay, jnp.einsum)
    return w.astype(k.dtype), u.astype(v.dtype)


def components(b, t, h, d, repeats: int, num_iter: int) -> None:
    """Time the kernels alone at one shape: chunk_scan with its backward (as GKA runs it: float32, bf16x3), the state
    pass in float32 and bf16 with and without correction keys, the gated delta rule's WY preparation (Pallas vs
    float32 XLA, as the previous version ran it) and GKA's solve (Pallas kernel with float32 or bf16 keys vs XLA)."""
    from pallas_kernels._pallas import BF16X3, backend_for
    from pallas_kernels.chunk_scan import ScanConfig, scan, state_pass
    from pallas_kernels.gka import Solver, _apply_prefix

    backend, c = backend_for(), 64
    bh, n = b * h, -(-t // c)
    rng = np.random.default_rng(0)
    normal = lambda *shape, s=1.0: jnp.asarray(rng.standard_normal(shape) * s, jnp.float32)
    kw, w, u = normal(bh, n, c, d, s=0.1), normal(bh, n, c, d, s=0.1), normal(bh, n, c, d)
    decay, s0 = jnp.full((bh, n), 0.9, jnp.float32), jnp.zeros((bh, d, d), jnp.float32)
    print("| component | fwd ms | fwd+bwd ms |\n|---|---|---|")
    config = ScanConfig(exact=BF16X3)
    fwd = jax.jit(lambda *a: scan(backend, *a, config))
    both = jax.jit(jax.grad(lambda *a: sum(jnp.sum(o) for o in scan(backend, *a, config)), argnums=(0, 1, 2)))
    args = (kw, u, decay, s0)
    print(f"| chunk_scan (GKA's key statistics) | {median_ms(fwd, args, repeats):.3f} "
          f"| {median_ms(both, args, repeats):.3f} |")
    for name, dtype in (("float32", jnp.float32), ("bf16", jnp.bfloat16)):
        kw_, u_, w_ = (x.astype(dtype) for x in (kw, u, w))
        for corr, label in ((None, ""), (w_, " with correction keys (GDN)")):
            fwd = jax.jit(lambda *a: state_pass(backend, ScanConfig(), *a))
            print(f"| state_pass{label}, {name} | {median_ms(fwd, (kw_, u_, corr, decay, s0), repeats):.3f} | |")
    wy_args = (kw.astype(jnp.bfloat16), u.astype(jnp.bfloat16), jnp.full((bh, n, c), 0.5, jnp.float32),
               jnp.cumsum(jnp.full((bh, n, c), -0.01, jnp.float32), axis=-1))
    for name, prep in (("Pallas", functools.partial(_wy_pallas, backend)), ("XLA float32", _wy_xla)):
        fwd = jax.jit(prep)
        both = jax.jit(jax.grad(lambda *a, prep=prep: sum(jnp.sum(o.astype(jnp.float32)) for o in prep(*a)),
                                argnums=(0, 1, 2, 3)))
        print(f"| WY preparation (gated delta rule), {name} | {median_ms(fwd, wy_args, repeats):.3f} "
              f"| {median_ms(both, wy_args, repeats):.3f} |")
    past = normal(bh, n, 3 * d, d, s=d**-0.5)
    ops = (jnp.einsum("...nj,...nk->...jk", past, past), jnp.zeros((bh, n, c), jnp.float32), kw)  # G = 0: no decay
    f = jnp.full((bh, n, c, 1), 3.0 * d**0.5, jnp.float32)
    bf16_keys = (*ops[:2], kw.astype(jnp.bfloat16).astype(jnp.float32))  # as GKA's bf16 inputs give them
    for name, solver, ops_ in ((f"GKA solve, {num_iter} it, Pallas", Solver(num_iter, backend), ops),
                               (f"GKA solve, {num_iter} it, Pallas, bf16 keys",
                                Solver(num_iter, backend, keys_exact=True), bf16_keys),
                               (f"GKA solve, {num_iter} it, XLA HIGHEST", Solver(num_iter), ops),
                               (f"GKA solve, {num_iter} it, XLA {backend.precision(exact=True)}",
                                Solver(num_iter, None, backend.precision(exact=True)), ops)):
        solve = jax.jit(lambda *a, solver=solver: solver(_apply_prefix, a[:3], *a[3:]))
        try:
            print(f"| {name} | {median_ms(solve, (*ops_, u, 0.02 * f, f), repeats):.3f} | |")
        except Exception as e:  # noqa: BLE001 - e.g. more shared memory than the GPU has
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(PAPER_SHAPES), help="BxTxHxD,...")
    p.add_argument("--impls", default="pallas,chunked", help="ours to time: pallas, chunked")
    p.add_argument("--ops", default="gated_delta_rule,simple_gla,ssd,gka,causal_conv1d")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-iter", type=int, default=30)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--chunked-max-t", type=int, default=32768, help="skip chunked XLA above this T")
    p.add_argument("--components", action="store_true", help="time the kernels alone (first shape only)")
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    if args.components:
        print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, shape {args.shapes.split(',')[0]}")
        components(*(int(v) for v in args.shapes.split(",")[0].split("x")), args.repeats, args.num_iter)
        return
    peers = {} if args.no_peers else torch_peers()
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.dtype}, GKA {args.num_iter} iterations")
    print("| shape B×T×H×D | op | implementation | fwd ms | fwd+bwd ms | GFLOP fwd / fwd+bwd | TFLOP/s fwd / f+b "
          "| TB/s fwd / f+b | × floor fwd / f+b |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        b, t, h, d = (int(s) for s in shape.split("x"))
        x = inputs(b, t, h, d, dtype)
        for op in args.ops.split(","):
            rows = []
            if op == "ssd":
                problem = ssd_problem(b, t, h, d, groups=min(8, h))
                jx = [jnp.asarray(a, dtype if a.ndim == 4 else jnp.float32) for a in problem]
                impl = args.impls.split(",")[0]
                fn = functools.partial(ssd_through_simple_gla, impl=impl)
                rows.append((f"ours ({impl}) simple_gla", time_jax(fn, jx, args.repeats), impl == "pallas"))
                if "ssd" in peers:
                    import torch

                    tx = [torch.tensor(a, device="cuda", dtype=getattr(torch, args.dtype) if a.ndim == 4
                                       else torch.float32, requires_grad=a.ndim != 1) for a in problem]
                    tx[2] = tx[2].detach()
                    rows.append((peers["ssd"][0], time_torch(peers["ssd"][1], tx, args.repeats), False))
                model_op = "simple_gla"
            else:
                model_op = op
                for impl in ["chunked"] if op == "causal_conv1d" else args.impls.split(","):
                    if impl == "chunked" and t > args.chunked_max_t:
                        continue
                    label = "ours (XLA; no kernel)" if op == "causal_conv1d" else f"ours ({impl})"
                    try:
                        times = time_jax(ours(impl, args.num_iter)[op], x, args.repeats)
                    except Exception as e:  # noqa: BLE001 - one failing row must not lose the rest of the table
                        print(f"| {shape} | {op} | {label} | failed: {type(e).__name__}: {str(e)[:200]} |")
                        continue
                    rows.append((label, times, impl == "pallas" and op != "causal_conv1d"))
                if op in peers:
                    import torch

                    tx = [torch.tensor(np.asarray(a.astype(jnp.float32)), device="cuda",
                                       dtype=getattr(torch, args.dtype) if a.ndim == 4 else torch.float32,
                                       requires_grad=True) for a in x[:5]]
                    rows.append((peers[op][0], time_torch(peers[op][1], tx, args.repeats), False))
            for name, (fwd, both), modelled in rows:
                extra = "| | | |"
                if modelled:
                    flops = model_flops(model_op, b, t, h, d, d, num_iter=args.num_iter)
                    nbytes = model_bytes(model_op, b, t, h, d, d, dtype.itemsize)
                    tf = [f / (ms * 1e9) for f, ms in zip(flops, (fwd, both))]
                    tb = [n / (ms * 1e9) for n, ms in zip(nbytes, (fwd, both))]
                    floor = [max(f / (PEAK_TFLOPS * 1e9), n / (PEAK_TBS * 1e9)) for f, n in zip(flops, nbytes)]
                    extra = (f"| {flops[0] / 1e9:.0f} / {flops[1] / 1e9:.0f} | {tf[0]:.0f} / {tf[1]:.0f} "
                             f"| {tb[0]:.2f} / {tb[1]:.2f} | {fwd / floor[0]:.1f} / {both / floor[1]:.1f} |")
                print(f"| {shape} | {op} | {name} | {fwd:.2f} | {both:.2f} {extra}", flush=True)


if __name__ == "__main__":
    main()
