"""The training loop: only the selected parameters move, resumption is exact, SIGTERM saves first."""

import os
import signal

import numpy as np
import pytest

import priming_jax
from priming_jax.checkpoint import as_numpy_dict
from priming_jax.config import SSMConfig
from priming_jax.hybrid import alternating, layer_types_for, prime
from priming_jax.metrics import MetricsWriter
from priming_jax.recipe import base_config, stage_config
from priming_jax.train import Interrupted, LossSpec, lr_schedule, train_stage, trainable_regex
from tests.conftest import tiny_hf_model

SEQ = 16


class Stream:
    """A deterministic token stream with grain-like get_state/set_state; `die_at` simulates a crash."""

    def __init__(self, vocab, batch, die_at=None, on_step=None):
        self.vocab, self.batch, self.index, self.die_at, self.on_step = vocab, batch, 0, die_at, on_step

    def __next__(self):
        if self.die_at is not None and self.index == self.die_at:
            raise KeyboardInterrupt("simulated crash")
        if self.on_step:
            self.on_step(self.index)
        rng = np.random.RandomState(self.index)
        self.index += 1
        w = rng.randint(0, self.vocab, size=(self.batch, SEQ + 1)).astype(np.int32)
        return {"inputs": w[:, :-1], "targets": w[:, 1:], "loss_mask": np.ones((self.batch, SEQ), np.float32)}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


@pytest.fixture(scope="module")
def primed(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    tiny_hf_model("qwen3", num_hidden_layers=4).save_pretrained(path)
    teacher, cfg = priming_jax.load(path)
    hybrid, hcfg = prime(teacher, cfg, SSMConfig(layer_types_for(4, alternating(4), "gka"), gka_num_iter=5,
                                                  chunk_size=8))
    return teacher, hybrid, hcfg


def stage_cfg(steps=6, **kw):
    return stage_config(steps=steps, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, **kw)


def common(**kw):
    c = base_config().train
    c.update({"checkpoint_every": 2, "log_every": 1, "compute_dtype": "float32", **kw})
    return c


def run(tmp, teacher, hybrid, spec, cfg, stream, **kw):
    return train_stage("align", hybrid, teacher, spec, cfg, common(**kw), SEQ, lambda: stream, tmp / "ckpt",
                       MetricsWriter(tmp / "metrics"))


def losses(tmp):
    return {r["step"]: r["loss"] for r in MetricsWriter(tmp / "metrics").records()}


def test_stage1_changes_only_selected_parameters(primed, tmp_path):
    teacher, hybrid, hcfg = primed
    before = as_numpy_dict(hybrid)
    result = run(tmp_path, teacher, hybrid, LossSpec("align", ssm_layers=(1, 3)), stage_cfg(steps=3),
                 Stream(hcfg.vocab_size, 4))
    after = as_numpy_dict(result.model)
    regex = trainable_regex(("ssm",), hcfg.ssm.layer_types)
    moved = [k for k in before if before[k].tobytes() != after[k].tobytes()]
    assert moved and all(regex.search(k) for k in moved), moved
    frozen = [k for k in before if not regex.search(k)]
    assert frozen and all(before[k].tobytes() == after[k].tobytes() for k in frozen)
    assert all(k.startswith(("layers.1.mixer.", "layers.3.mixer.")) for k in moved)
    assert np.isfinite(result.last_metrics["loss"])


def test_align_loss_decreases(primed, tmp_path):
    teacher, hybrid, hcfg = primed
    run(tmp_path, teacher, hybrid, LossSpec("align", ssm_layers=(1, 3)), stage_cfg(steps=12), Stream(hcfg.vocab_size, 4))
    curve = losses(tmp_path)
    assert curve[12] < curve[1]


def test_resume_matches_uninterrupted(primed, tmp_path):
    teacher, hybrid, hcfg = primed
    spec, vocab = LossSpec("ntp", ssm_layers=(1, 3)), hcfg.vocab_size
    run(tmp_path / "whole", teacher, hybrid, spec, stage_cfg(), Stream(vocab, 4))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", teacher, hybrid, spec, stage_cfg(), Stream(vocab, 4, die_at=5))
    run(tmp_path / "cut", teacher, hybrid, spec, stage_cfg(), Stream(vocab, 4))  # resumes from step 4
    whole, cut = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(whole) == list(range(1, 7))
    for step in range(5, 7):
        assert abs(whole[step] - cut[step]) <= 1e-6, (step, whole[step], cut[step])


def test_sigterm_saves_then_stops(primed, tmp_path):
    teacher, hybrid, hcfg = primed
    term = lambda i: os.kill(os.getpid(), signal.SIGTERM) if i == 2 else None
    with pytest.raises(Interrupted, match="step 3"):
        run(tmp_path, teacher, hybrid, LossSpec("ntp"), stage_cfg(), Stream(hcfg.vocab_size, 4, on_step=term),
            checkpoint_every=100)
    assert (tmp_path / "ckpt" / "3").is_dir()


def test_schedules():
    for kind in ("constant", "cosine", "linear"):
        s = lr_schedule(kind, 1.0, 10, 100)
        assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(lr_schedule("linear", 1.0, 10, 100)(100))) < 1e-6
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule("exp", 1.0, 1, 10)


def test_bad_trainable_pattern(primed, tmp_path):
    teacher, hybrid, hcfg = primed
    with pytest.raises(ValueError, match="matches no parameter"):
        run(tmp_path, teacher, hybrid, LossSpec("ntp"), stage_cfg(trainable=("nothing_here",)), Stream(128, 4))
