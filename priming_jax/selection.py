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


# ------------------------------------------------------------------------------------------- recall task


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """A synthetic associative-recall task: can the model fetch a value it saw far back?

    Each sequence of `seq_len` input tokens reads
        x..x  a_1 b_1 v_1 s s'  a_2 b_2 v_2 s s'  ...  a_P b_P v_P s s'    P context pairs
              a_i b_i v_i s s'  ...  a_j b_j [v_j]                         `num_queries` queries
    a key is two tokens (a b), a value one (v), the separator two (s s'); x..x are 0-4 filler tokens (used
    nowhere else) that pad it to length, and the last query's value is only a target. Queries ask for the keys
    of the first P//2 pairs, each once, in random order, so every one lies at least `min_distance` tokens back:
    a layer whose window is shorter cannot see it directly. A query is scored at its key's last token: correct
    when the greedy (teacher-forced) next-token prediction is its value. Keys, values, filler and separator are
    distinct tokens drawn per sequence from `token_ids` (default: the middle band [vocab/10, vocab/2) of the
    vocabulary, which in byte-level BPE vocabularies holds ordinary word pieces, away from special and byte
    tokens and from rare or unused ids); `separator` fixes the separator instead (`recall_task_for` uses
    comma + newline).
    The format is tuned for small models: SmolLM2-135M with full attention answers 5 % of the queries with
    one-token keys behind one random separator, ~30 % in this format, ~77 % with comma + newline.
    """

    seq_len: int = 256
    num_queries: int = 16
    num_sequences: int = 4
    token_ids: tuple[int, ...] | None = None
    separator: tuple[int, ...] | None = None

    @property
    def sep_len(self) -> int:
        return 2 if self.separator is None else len(self.separator)

    @property
    def unit(self) -> int:
        """Tokens per pair: key, value, separator."""
        return 3 + self.sep_len

    @property
    def num_pairs(self) -> int:
        return (self.seq_len + 1 + self.sep_len) // self.unit - self.num_queries

    @property
    def min_distance(self) -> int:
        """Shortest distance from a query's last key token back to the value it must fetch."""
        p = self.num_pairs
        return self.unit * (p - p // 2 + 1) - 1

    def pool(self, vocab_size: int) -> np.ndarray:
        ids = range(vocab_size // 10, vocab_size // 2) if self.token_ids is None else self.token_ids
        return np.setdiff1d(np.asarray(ids, np.int64), self.separator or ())


def recall_task_for(tokenizer, **kw) -> RecallTask:
    """The recall task with comma + newline as the separator: real models recall far better across punctuation."""
    return RecallTask(separator=tuple(tokenizer.encode(",\n", add_special_tokens=False)), **kw)


def recall_batches(task: RecallTask, vocab_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One batch in the held-out format: "inputs", "targets" (next token), "loss_mask" (1 at query keys), [B, T]."""
    p, q, unit = task.num_pairs, task.num_queries, task.unit
    if q < 1 or q > p // 2:
        raise ValueError(f"RecallTask(seq_len={task.seq_len}) holds {p} pairs; num_queries must be in 1..{p // 2}")
    pool = task.pool(vocab_size)
    need = 3 * p + (task.sep_len if task.separator is None else 0)
    pad = task.seq_len + 1 + task.sep_len - unit * (p + q)
    if len(pool) < need + pad or pool[0] < 0 or pool[-1] >= vocab_size:
        raise ValueError(f"the recall task needs {need + pad} distinct token ids in 0..{vocab_size - 1}; "
                         f"its pool has {len(pool)} in {pool[0]}..{pool[-1]}")
    rng = np.random.default_rng(seed)
    inputs, targets, mask = (np.zeros((task.num_sequences, task.seq_len), np.int32) for _ in range(3))
    for b in range(task.num_sequences):
        drawn = rng.choice(pool, size=need + pad, replace=False)
        keys, values, filler = drawn[:2 * p].reshape(p, 2), drawn[2 * p:3 * p], drawn[3 * p:3 * p + pad]
        sep = drawn[3 * p + pad:] if task.separator is None else np.asarray(task.separator)
        pairs = np.concatenate([np.arange(p), rng.permutation(p // 2)[:q]])
        units = np.concatenate([keys[pairs], values[pairs, None], np.tile(sep, (p + q, 1))], axis=1)
        seq = np.concatenate([filler, units.reshape(-1)[:-task.sep_len]])  # seq_len + 1 tokens
        inputs[b], targets[b] = seq[:-1], seq[1:]
        mask[b, pad + unit * (p + np.arange(q)) + 1] = 1
    return [{"inputs": inputs, "targets": targets, "loss_mask": mask}]


# -------------------------------------------------------------------------------------------- selection


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
    if method == "importance":
        m = round(ratio * n) if num_ssm is None else num_ssm
        if not 0 <= m <= n:
            raise ValueError(f"num_ssm={m} is outside 0..{n} (the model has {n} layers)")
        scores = importance_scores(model, cfg, heldout_batches=heldout_batches, window=window, recall=recall,
                                   seed=seed)
        return most_replaceable(scores["score"], m)
    chosen = validate_layer_list(layers, n) if method == "list" else alternating(n)
    if num_ssm is not None and num_ssm != len(chosen):
        raise ValueError(f"num_ssm={num_ssm} disagrees with the {method!r} pattern of {len(chosen)} layers {chosen}")
    return chosen


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
    if not ppl_batches and recall is None:
        raise ValueError("the importance probe needs held-out batches, a recall task, or both")
    if ppl_batches and not any(b["loss_mask"].any() for b in ppl_batches):
        raise ValueError("the held-out batches have no scored tokens (loss_mask is all zero)")
    rec_batches = [] if recall is None else recall_batches(recall, cfg.vocab_size, seed)
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
    return {"window": window, "base_ppl": base_ppl, "base_recall": base_acc, "ppl": ppl, "recall": acc,
            "score": replaceability(ppl, base_ppl, acc, base_acc), "seconds": time.time() - start}


def replaceability(ppl, base_ppl, recall, base_recall) -> list[float]:
    """score_l = -(z(log ppl_l - log base_ppl) + z(base_recall - recall_l)) / 2; a task given as None is left out."""
    terms = []
    if base_ppl is not None:
        terms.append(_z(np.log(ppl) - np.log(base_ppl)))
    if base_recall is not None:
        terms.append(_z(base_recall - np.asarray(recall, np.float64)))
    return [0.0 - float(t) for t in np.mean(terms, axis=0)]


def _z(x: np.ndarray) -> np.ndarray:
    std = x.std()
    return np.zeros_like(x) if std == 0 else (x - x.mean()) / std
