"""One training loop for both Priming stages.

Stage 1 (align): a frozen teacher (the source Transformer) and the hybrid student see the same tokens; the loss is
the MSE between their final-normed hidden states (default), or per-layer mixer / block outputs, plus an optional
KL on logits. Stage 2 (posttrain): next-token cross-entropy with loss masks, plus an optional distillation KL.

The model is split into trainable and frozen parameters by name patterns: gradients are taken w.r.t. the
trainable part only (so frozen parameters stay bit-identical), kept in fp32 (master weights) with fp32 optimizer
state, and cast to the compute dtype (bf16 by default) inside the step. A step accumulates gradients over
micro-batches with `lax.scan`. Checkpoints (Orbax, async, keep-N) hold the trainable parameters, the optimizer
state, the step, the data iterator's state and the RNG key, so a killed run resumes exactly; SIGTERM saves first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from priming_jax.metrics import MetricsWriter

# Shorthands usable in `trainable` patterns; anything else is a regular expression over dotted parameter names.
GROUPS = {
    "all": r".*",
    "norms": r"(^|\.)(input_norm|post_norm|norm|q_norm|k_norm|o_norm|B_norm|C_norm)\.weight$",
    "mlp": r"^layers\.\d+\.mlp\.",
    "embeddings": r"^(embed|lm_head)$",
}


class Interrupted(Exception):
    """Raised after SIGTERM once the checkpoint is saved; rerunning the same command resumes."""


def name_of(path) -> str:
    return ".".join(str(p) for p in path)


def trainable_regex(patterns, layer_types: tuple[str, ...]) -> re.Pattern:
    """Compile patterns; "ssm" / "attention" mean the mixers of those layers, GROUPS hold the other names."""
    ssm = [i for i, t in enumerate(layer_types) if t != "attention"]
    attn = [i for i, t in enumerate(layer_types) if t == "attention"]
    expanded = []
    for p in patterns:
        if p in ("ssm", "attention"):
            layers = ssm if p == "ssm" else attn
            expanded.append(rf"^layers\.({'|'.join(map(str, layers)) or 'none'})\.mixer\.")
        else:
            expanded.append(GROUPS.get(p, p))
    try:
        return re.compile("|".join(f"(?:{p})" for p in expanded))
    except re.error as e:
        raise ValueError(f"bad trainable pattern in {list(patterns)}: {e}") from e


def split_trainable(model, regex: re.Pattern):
    """(graphdef, trainable state, frozen state); fails if the patterns select nothing."""
    is_trainable = lambda path, v: isinstance(v, nnx.Param) and bool(regex.search(name_of(path)))
    graphdef, trainable, frozen = nnx.split(model, is_trainable, ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"trainable pattern {regex.pattern!r} matches no parameter")
    return graphdef, trainable, frozen


def cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ------------------------------------------------------------------------------------------------- losses


def masked_cross_entropy(logits, targets, mask):
    """Mean next-token cross-entropy (nats) over positions with mask > 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def kl_to_teacher(student_logits, teacher_logits, mask):
    """KL(teacher || student) per token, averaged over mask."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
    kl = (jnp.exp(t) * (t - s)).sum(-1)
    return (kl * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def mse(a, b):
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


ALIGN_TARGETS = ("final_hidden", "mixer", "block", "local_mixer")


def relative_mse(pred, target):
    """MSE normalized by the target's mean square, so layers of different scale weigh the same."""
    target = target.astype(jnp.float32)
    return mse(pred, target) / jnp.maximum(jnp.mean(jnp.square(target)), 1e-12)


def local_mixer_loss(student, teacher_taps, ssm_layers, positions):
    """Mean relative MSE of each SSM mixer, run on the teacher's mixer input, against the attention output."""
    losses = []
    for i in ssm_layers:
        x_in = jax.lax.stop_gradient(teacher_taps["mixer_in"][i])
        y, _ = student.layers[i].mixer(x_in, positions)
        losses.append(relative_mse(y, jax.lax.stop_gradient(teacher_taps["mixer"][i])))
    return sum(losses) / len(losses)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What a stage minimizes. kind: "align" (hidden-state MSE to the teacher) or "ntp" (next-token CE)."""

    kind: str
    # final_hidden | mixer | block (per replaced layer, student on its own hidden states) | local_mixer (each SSM
    # mixer fed the teacher's input to the attention it replaces: layer-local, no backprop through the stack)
    align_target: str = "final_hidden"
    kl_weight: float = 0.0  # align: KL on logits; ntp: distillation term (needs the teacher)
    ssm_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in ("align", "ntp"):
            raise ValueError(f"loss kind must be 'align' or 'ntp', got {self.kind!r}")
        if self.align_target not in ALIGN_TARGETS:
            raise ValueError(f"align_target must be one of {ALIGN_TARGETS}, got {self.align_target!r}")

    @property
    def needs_teacher(self) -> bool:
        return self.kind == "align" or self.kl_weight > 0


def stage_loss(spec: LossSpec, student, teacher, batch, remat: bool):
    """Scalar loss and metrics for one micro-batch."""
    tokens, mask = batch["inputs"], batch["loss_mask"]
    metrics = {}
    if spec.kind == "align" and spec.align_target == "local_mixer":
        _, _, ttaps = teacher.hidden(tokens, taps=True)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        loss = local_mixer_loss(student, ttaps, spec.ssm_layers, positions)
        return loss, {"mse": loss}
    per_layer = spec.kind == "align" and spec.align_target != "final_hidden"
    h, _, taps = student.hidden(tokens, taps=per_layer, remat=remat)
    if spec.needs_teacher:
        th, _, ttaps = teacher.hidden(tokens, taps=per_layer)
        th = jax.lax.stop_gradient(th)
    if spec.kind == "align":
        if per_layer:
            key = spec.align_target
            loss = sum(mse(taps[key][i], jax.lax.stop_gradient(ttaps[key][i])) for i in spec.ssm_layers)
            loss = loss / max(len(spec.ssm_layers), 1)
        else:
            loss = mse(h, th)
        metrics["mse"] = loss
        if spec.kl_weight > 0:
            kl = kl_to_teacher(student.logits(h), teacher.logits(th), mask)
            loss, metrics["kl"] = loss + spec.kl_weight * kl, kl
    else:
        logits = student.logits(h)
        ce = masked_cross_entropy(logits, batch["targets"], mask)
        loss, metrics["ce"] = ce, ce
        if spec.kl_weight > 0:
            kl = kl_to_teacher(logits, teacher.logits(th), mask)
            loss, metrics["kl"] = loss + spec.kl_weight * kl, kl
    return loss, metrics


# ---------------------------------------------------------------------------------------------- optimizer


def lr_schedule(kind: str, lr: float, warmup: int, total: int) -> optax.Schedule:
    """Linear warm-up, then constant, cosine (to 10 % of lr) or linear (to 0) decay over the remaining steps."""
    warmup = min(warmup, max(total - 1, 0))
    rest = max(total - warmup, 1)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=0.1)
    elif kind == "linear":
        after = optax.linear_schedule(lr, 0.0, rest)
    else:
        raise ValueError(f"schedule must be constant, cosine or linear, got {kind!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; weight decay only on matrices (not norms, biases or per-head scalars)."""
    schedule = lr_schedule(cfg.schedule, cfg.lr, cfg.warmup_steps, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    return tx, schedule


# ------------------------------------------------------------------------------------------------- stage


@dataclasses.dataclass
class StageResult:
    model: Any
    steps: int
    tokens: int
    wall_s: float
    last_metrics: dict


def make_train_step(graphdef, teacher_graphdef, spec: LossSpec, tx, accum: int, compute_dtype, remat: bool):
    def loss_fn(trainable, frozen, teacher_state, batch):
        student = nnx.merge(graphdef, cast_floats(trainable, compute_dtype), frozen)
        teacher = nnx.merge(teacher_graphdef, teacher_state) if spec.needs_teacher else None
        return stage_loss(spec, student, teacher, batch, remat)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, frozen, teacher_state, batch):
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

        def accumulate(carry, mb):
            (loss, metrics), grads = grad_fn(trainable, frozen, teacher_state, mb)
            return jax.tree.map(jnp.add, carry, grads), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        grads, (losses, metrics) = jax.lax.scan(accumulate, zeros, micro)
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {k: v.mean() for k, v in metrics.items()}
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics.update(loss=losses.mean(), grad_norm=grad_norm)
        return trainable, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step (restores the old handler on exit)."""

    def __enter__(self):
        self.raised = False
        self.old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.raised = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.old)


def train_stage(name: str, student, teacher, spec: LossSpec, cfg, common, seq_len: int, data_iter_fn: Callable,
                ckpt_dir: Path, metrics: MetricsWriter, source_tokens: float | None = None) -> StageResult:
    """Run (or resume) one stage. `data_iter_fn()` returns a fresh iterator with get_state/set_state.

    cfg: the stage's config (steps, batch_size, grad_accum, lr, schedule, warmup_steps, grad_clip, b1, b2,
    weight_decay, trainable); common: compute_dtype, remat, checkpoint_every, keep_checkpoints, log_every.
    """
    import orbax.checkpoint as ocp

    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"{name}: batch_size {cfg.batch_size} is not a multiple of grad_accum {cfg.grad_accum}")
    layer_types = student.config.ssm.layer_types if student.config.ssm else ()
    regex = trainable_regex(cfg.trainable, layer_types)
    graphdef, trainable, frozen = split_trainable(student, regex)
    orig_dtypes = jax.tree.map(lambda x: x.dtype, trainable)
    # fp32 master copies: fresh buffers, so donating them never touches the caller's (or the teacher's) arrays
    trainable = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), trainable)
    compute_dtype = jnp.dtype(common.compute_dtype)
    frozen_compute = cast_floats(frozen, compute_dtype)
    teacher_graphdef, teacher_state = (nnx.split(teacher) if spec.needs_teacher else (None, None))
    if teacher_state is not None:
        teacher_state = cast_floats(teacher_state, compute_dtype)
    tx, schedule = make_optimizer(cfg, cfg.steps)
    opt_state = tx.init(trainable)
    step_fn = make_train_step(graphdef, teacher_graphdef, spec, tx, cfg.grad_accum, compute_dtype, common.remat)

    data = data_iter_fn()
    manager = ocp.CheckpointManager(
        Path(ckpt_dir).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=common.keep_checkpoints, create=True),
    )
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        restored = manager.restore(start, args=ocp.args.Composite(
            train=ocp.args.StandardRestore({"params": trainable, "opt": opt_state}),
            data=ocp.args.JsonRestore(),
        ))
        trainable, opt_state = restored["train"]["params"], restored["train"]["opt"]
        data.set_state(restored["data"]["iterator"])
        print(f"{name}: resumed from step {start} ({ckpt_dir})")

    def save(step: int):
        manager.save(step, args=ocp.args.Composite(
            train=ocp.args.StandardSave({"params": trainable, "opt": opt_state}),
            data=ocp.args.JsonSave({"iterator": data.get_state(), "step": step}),
        ))

    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    tokens_per_step = cfg.batch_size * seq_len
    bar = tqdm(total=cfg.steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
    last, t0, wall0 = {}, time.time(), time.time()
    with _SigtermFlag() as sigterm:
        for step in range(start, cfg.steps):
            batch = next(data)
            batch = {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "loss_mask")}
            trainable, opt_state, m = step_fn(trainable, opt_state, frozen_compute, teacher_state, batch)
            done = step + 1
            if done % common.log_every == 0 or done == cfg.steps or sigterm.raised:
                last = {k: float(v) for k, v in m.items()}
                elapsed = time.time() - t0
                tps = tokens_per_step * (done - start) / max(elapsed, 1e-9)
                record = {"stage": name, "step": done, "lr": float(schedule(step)), "tokens": done * tokens_per_step,
                          "tokens_per_s": tps, **last}
                if source_tokens:
                    record["pct_of_pretraining"] = 100.0 * done * tokens_per_step / source_tokens
                metrics.write(record)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tps:,.0f}")
            bar.update(1)
            if done % common.checkpoint_every == 0 or done == cfg.steps or sigterm.raised:
                save(done)
            if sigterm.raised:
                manager.wait_until_finished()
                bar.close()
                raise Interrupted(f"{name}: SIGTERM at step {done}; checkpoint saved in {ckpt_dir}")
    manager.wait_until_finished()
    bar.close()
    trainable = jax.tree.map(lambda x, d: x.astype(d), trainable, orig_dtypes)
    model = nnx.merge(graphdef, trainable, frozen)
    print(f"{name}: {cfg.steps} steps, {n_trainable:,} trainable parameters, "
          f"{cfg.steps * tokens_per_step:,} tokens")
    return StageResult(model, cfg.steps, cfg.steps * tokens_per_step, time.time() - wall0, last)


def make_eval_fn(model):
    """Jitted held-out evaluation: returns (sum of token NLL, token count) for a batch."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, inputs, targets, mask):
        m = nnx.merge(graphdef, state)
        logp = jax.nn.log_softmax(m(inputs).astype(jnp.float32), -1)
        tok = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return (tok * mask).sum(), mask.sum()

    return lambda batch: nll(state, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]),
                             jnp.asarray(batch["loss_mask"]))


def perplexity(model, batches) -> float:
    """exp(mean next-token NLL) over the held-out batches."""
    fn = make_eval_fn(model)
    total, count = 0.0, 0.0
    for batch in batches:
        s, n = fn(batch)
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise ValueError("held-out set has no scored tokens")
    return float(np.exp(total / count))


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))
