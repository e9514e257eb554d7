"""Which attention layers become SSMs (SPEC §3): alternating, an explicit list, or importance by a probe.

The importance probe follows the paper without training: for each layer l, a copy of the source model in which only
layer l attends through a sliding window (the copy shares the source's parameter arrays) is scored on
  (a) held-out perplexity over the caller's batches, and
  (b) a synthetic long-range recall task (`RecallTask`, `recall_batches`).
A layer whose copy degrades least when it loses long context is the most replaceable by an SSM.

Score (higher = more replaceable), over the L probe copies:
    score_l = -(z(log ppl_l - log ppl_base) + z(acc_base - acc_l)) / 2,   z(x) = (x - mean(x)) / std(x)
(z is 0 where std is 0; a term is left out when its task is not run). z-scoring puts the two tasks on one scale
whatever their units, as the paper averages its task scores.

Cost: the copies agree with the source below layer l, so the probe keeps the source's hidden states per batch,
layer by layer, and runs each copy from layer l up only (L(L+1)/2 block calls instead of L²). Blocks are jitted one
at a time; structurally equal blocks share one compilation, so a Transformer compiles twice per batch shape
(full and windowed attention) instead of once per probe.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from numbers import Integral

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from priming_jax.config import ModelConfig
from priming_jax.hf_io import fill_model, param_values
from priming_jax.hybrid import alternating
from priming_jax.transformer import abstract_model

METHODS = ("alternating", "list", "importance")


def select_layers(method: str, model, cfg: ModelConfig, *, num_ssm: int | None = None, ratio: float = 0.5,
                  layers=(), heldout_batches=None, window: int = 64,
                  recall: RecallTask | None = RecallTask(), seed: int = 0) -> list[int]:
    """Sorted indices of the layers that become SSMs.

    method: "alternating" (odd layers, the release's configs), "list" (`layers`, validated) or "importance"
    (the sliding-window probe of `importance_scores`; keeps the `num_ssm` most replaceable layers).
    num_ssm defaults to round(ratio · num_layers); for "alternating" and "list" an explicit num_ssm must agree
    with the pattern. heldout_batches, window, recall and seed go to `importance_scores`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown layer selection method {method!r}; choose one of {METHODS}")
    n = cfg.num_layers
    if method == "list":
        chosen = validate_layer_list(layers, n)
    elif method == "alternating":
        chosen = alternating(n)
    if method != "importance":
        if num_ssm is not None and num_ssm != len(chosen):
            raise ValueError(f"num_ssm={num_ssm} disagrees with the {method!r} pattern of {len(chosen)} layers "
                             f"{chosen}")
        return chosen
    m = round(ratio * n) if num_ssm is None else num_ssm
    if not 0 <= m <= n:
        raise ValueError(f"num_ssm={m} is outside 0..{n} (the model has {n} layers)")
    scores = importance_scores(model, cfg, heldout_batches=heldout_batches, window=window,
                               recall=recall, seed=seed)
    return most_replaceable(scores["score"], m)


def validate_layer_list(layers, num_layers: int) -> list[int]:
    """The explicit list, sorted, after checking each index (an int in range, listed once)."""
    layers = list(layers)
    if len(layers) > num_layers:
        raise ValueError(f"{len(layers)} SSM layers listed, but the model has only {num_layers} layers")
    seen = set()
    for i in layers:
        if not isinstance(i, Integral) or isinstance(i, bool):
            raise ValueError(f"layer index {i!r} is not an integer")
        if not 0 <= i < num_layers:
            raise ValueError(f"layer index {i} is outside 0..{num_layers - 1}")
        if i in seen:
            raise ValueError(f"layer index {i} is listed twice")
        seen.add(i)
    return sorted(int(i) for i in layers)


def most_replaceable(scores, num_ssm: int) -> list[int]:
    """Indices of the `num_ssm` highest scores, sorted; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:num_ssm])


# ------------------------------------------------------------------------------------------- recall task


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """A synthetic associative-recall task: can the model fetch a value it saw far back?

    Each sequence (`seq_len` tokens) is, after 0-2 leading separators that pad it to length:
        k_1 v_1 s  k_2 v_2 s  ...  k_P v_P s     P context pairs
        k_a v_a s  k_b v_b s  ...  k_z           `num_queries` queries: keys of the first P//2 pairs, shuffled
    with s one separator token and all keys, values and s distinct tokens drawn from `token_ids` (default: the
    middle band [vocab/10, vocab/2) of the vocabulary, which in byte-level BPE vocabularies holds ordinary
    word pieces, away from special/byte tokens and rare or unused ids). A query is scored at its key: correct when
    the greedy next-token prediction (teacher-forced) is its value. Every queried pair lies at least
    `min_distance` tokens back, so a layer with a shorter window cannot see it directly.
    """

    seq_len: int = 256
    num_queries: int = 16
    num_sequences: int = 4
    token_ids: tuple[int, ...] | None = None

    @property
    def num_pairs(self) -> int:
        return (self.seq_len + 1) // 3 - self.num_queries

    @property
    def min_distance(self) -> int:
        """Shortest distance from a query's key back to the value it must fetch."""
        p = self.num_pairs
        return 3 * (p - p // 2) + 2

    def pool(self, vocab_size: int) -> np.ndarray:
        ids = range(vocab_size // 10, vocab_size // 2) if self.token_ids is None else self.token_ids
        return np.unique(np.asarray(ids, np.int64))


def recall_batches(task: RecallTask, vocab_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One batch in the held-out format: "inputs", "targets" (next token), "loss_mask" (1 at query keys), [B, T]."""
    p, q = task.num_pairs, task.num_queries
    if q < 1 or q > p // 2:
        raise ValueError(f"RecallTask(seq_len={task.seq_len}) holds {p} pairs; num_queries must be in 1..{p // 2}")
    pool = task.pool(vocab_size)
    if len(pool) < 2 * p + 1 or pool[0] < 0 or pool[-1] >= vocab_size:
        raise ValueError(f"the recall task needs {2 * p + 1} distinct token ids in 0..{vocab_size - 1}; "
                         f"its pool has {len(pool)} in {pool[0]}..{pool[-1]}")
    rng = np.random.default_rng(seed)
    pad = task.seq_len - (3 * (p + q) - 1)
    inputs, targets, mask = (np.zeros((task.num_sequences, task.seq_len), np.int32) for _ in range(3))
    for b in range(task.num_sequences):
        drawn = rng.choice(pool, size=2 * p + 1, replace=False)
        sep, keys, values = drawn[0], drawn[1:p + 1], drawn[p + 1:]
        asked = rng.permutation(p // 2)[:q]
        pairs = np.concatenate([np.arange(p), asked])
        triples = np.stack([keys[pairs], values[pairs], np.full(p + q, sep)], axis=1).reshape(-1)
        seq = np.concatenate([np.full(pad, sep), triples])  # seq_len + 1 tokens: the last separator is dropped
        inputs[b], targets[b] = seq[:-1], seq[1:]
        mask[b, pad + 3 * (p + np.arange(q))] = 1
    return [{"inputs": inputs, "targets": targets, "loss_mask": mask}]


# ---------------------------------------------------------------------------------------------- the probe


def probe_model(model, cfg: ModelConfig, layer: int, window: int):
    """`model` with only `layer` attending through a sliding `window`; it shares `model`'s parameter arrays."""
    windows = list(cfg.sliding_windows or (None,) * cfg.num_layers)
    windows[layer] = min(windows[layer], window) if windows[layer] else window
    return fill_model(abstract_model(cfg.replace(sliding_windows=tuple(windows))), param_values(model))


@functools.partial(jax.jit, static_argnums=0)
def _run_block(graphdef, state, x, positions):
    return nnx.merge(graphdef, state)(x, positions)[0]


def _block(block, x, positions):
    graphdef, state = nnx.split(block)
    return _run_block(graphdef, state, x, positions)


def _readout(model, x, batch) -> tuple[float, int, int]:
    """(summed NLL, scored tokens, greedy hits) at the batch's loss-mask positions, from last-block states."""
    rows, cols = np.nonzero(batch["loss_mask"])
    logits = model.logits(model.norm(x[rows, cols])).astype(jnp.float32)
    targets = jnp.asarray(batch["targets"][rows, cols])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[:, None], -1).sum()
    return float(nll), len(rows), int((jnp.argmax(logits, -1) == targets).sum())


def importance_scores(model, cfg: ModelConfig, *, heldout_batches=None, window: int = 64,
                      recall: RecallTask | None = RecallTask(), seed: int = 0) -> dict:
    """Per-layer results of the sliding-window probe (formula in the module docstring), JSON-ready.

    heldout_batches: dicts of "inputs", "targets", "loss_mask" [B, T] (None: perplexity is not scored);
    recall: the recall task (None: not scored), drawn with `seed`.
    Returns {"window", "base_ppl", "base_recall", "ppl", "recall", "score", "seconds"}, lists indexed by layer.
    """
    if cfg.ssm is not None:
        raise ValueError("the importance probe needs a Transformer; this model is already a hybrid")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    ppl_batches = [{k: np.asarray(b[k]) for k in ("inputs", "targets", "loss_mask")} for b in heldout_batches or ()]
    rec_batches = [] if recall is None else recall_batches(recall, cfg.vocab_size, seed)
    if not ppl_batches and not rec_batches:
        raise ValueError("the importance probe needs held-out batches, a recall task, or both")
    if recall is not None and window >= recall.min_distance:
        warnings.warn(f"window {window} reaches the recall task's queried pairs ({recall.min_distance} tokens "
                      "back); recall cannot tell the layers apart", stacklevel=2)
    start = time.time()
    batches = ppl_batches + rec_batches
    tokens = [jnp.asarray(b["inputs"]) for b in batches]
    positions = [jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32), t.shape) for t in tokens]
    hidden = [jnp.take(model.embed[...], t, axis=0) for t in tokens]  # the source's input to the current layer

    def evaluate(net, first: int, states) -> tuple[float | None, float | None]:
        totals = np.zeros((2, 3))  # [ppl, recall] x [nll, tokens, hits]
        for i, (x, pos, batch) in enumerate(zip(states, positions, batches)):
            for block in net.layers[first:]:
                x = _block(block, x, pos)
            totals[int(i >= len(ppl_batches))] += _readout(net, x, batch)
        ppl = float(np.exp(totals[0, 0] / totals[0, 1])) if ppl_batches else None
        acc = float(totals[1, 2] / totals[1, 1]) if rec_batches else None
        return ppl, acc

    ppl, acc = [], []
    for layer in tqdm(range(cfg.num_layers), desc=f"importance probe (window {window})", unit="layer"):
        p, a = evaluate(probe_model(model, cfg, layer, window), layer, hidden)
        ppl.append(p)
        acc.append(a)
        hidden = [_block(model.layers[layer], x, pos) for x, pos in zip(hidden, positions)]
    base_ppl, base_acc = evaluate(model, cfg.num_layers, hidden)
    terms = []
    if ppl_batches:
        terms.append(_z(np.log(ppl) - np.log(base_ppl)))
    if rec_batches:
        terms.append(_z(base_acc - np.asarray(acc)))
    score = -np.mean(terms, axis=0)
    return {"window": window, "base_ppl": base_ppl, "base_recall": base_acc, "ppl": ppl, "recall": acc,
            "score": [float(s) for s in score], "seconds": time.time() - start}


def _z(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return np.zeros_like(x) if std == 0 else (x - x.mean()) / std
