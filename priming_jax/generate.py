"""Simple KV-cache decoding: one jitted prefill, then one jitted step per token (greedy or temperature sampling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _step_fn(graphdef):
    @jax.jit
    def step(state, tokens, cache, key, temperature):
        model = nnx.merge(graphdef, state)
        logits, cache = model(tokens, cache=cache)
        last = logits[:, -1].astype(jnp.float32)
        sampled = jax.random.categorical(key, last / jnp.maximum(temperature, 1e-6))
        nxt = jnp.where(temperature > 0, sampled, jnp.argmax(last, -1))
        return nxt.astype(jnp.int32), cache

    return step


def generate(model, tokens, max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
             eos_id: int | None = None) -> np.ndarray:
    """Continue `tokens` [B, T] by `max_new_tokens`; returns [B, T + new] (rows stop growing only by eos fill).

    temperature 0 is greedy decoding. After a row emits `eos_id`, it keeps emitting `eos_id`.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    batch, prompt_len = tokens.shape
    graphdef, state = nnx.split(model)
    step = _step_fn(graphdef)
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    key = jax.random.PRNGKey(seed)
    temp = jnp.float32(temperature)
    out = [tokens]
    done = jnp.zeros((batch,), bool)
    nxt, cache = step(state, tokens, cache, key, temp)
    for i in range(max_new_tokens):
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        out.append(nxt[:, None])
        if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        key, sub = jax.random.split(key)
        nxt, cache = step(state, nxt[:, None], cache, sub, temp)
    return np.asarray(jnp.concatenate(out, axis=1))
