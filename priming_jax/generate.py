"""KV-cache decoding: one jitted prefill, then one jitted step per token (greedy or temperature sampling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def jitted(model):
    """`model(tokens, cache=None)` compiled once per input shape (the model's parameters are arguments)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache=cache)

    return lambda tokens, cache=None: forward(state, jnp.asarray(tokens), cache)


def generate(model, tokens, max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
             eos_id: int | None = None) -> np.ndarray:
    """Continue `tokens` [B, T] by up to `max_new_tokens`; returns [B, T + new].

    temperature 0 is greedy decoding. After a row emits `eos_id` it keeps emitting `eos_id`; decoding stops
    early once every row has.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    batch, prompt_len = tokens.shape
    forward = jitted(model)
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    key = jax.random.PRNGKey(seed)
    out, done = [tokens], jnp.zeros((batch,), bool)
    logits, cache = forward(tokens, cache)
    for i in range(max_new_tokens):
        last = logits[:, -1].astype(jnp.float32)
        if temperature > 0:
            key, sub = jax.random.split(key)
            nxt = jax.random.categorical(sub, last / temperature).astype(jnp.int32)
        else:
            nxt = jnp.argmax(last, -1).astype(jnp.int32)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        out.append(nxt[:, None])
        if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        logits, cache = forward(nxt[:, None], cache)
    return np.asarray(jnp.concatenate(out, axis=1))
