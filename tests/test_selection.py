"""Layer selection (SPEC §3): alternating, explicit lists, and the sliding-window importance probe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import priming_jax
from priming_jax.generate import jitted
from priming_jax.hf_io import fill_model, param_values
from priming_jax.selection import (RecallTask, importance_scores, most_replaceable, probe_model, recall_batches,
                                   recall_task_for, replaceability, select_layers)
from priming_jax.transformer import abstract_model
from tests.conftest import tiny_hf_model

SEQ = 64
TASK = RecallTask(seq_len=SEQ, num_queries=4, num_sequences=2)  # 9 pairs; queries 29+ tokens back


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_hf_model("llama", num_hidden_layers=4).save_pretrained(path)
    return priming_jax.load(path)


@pytest.fixture(scope="module")
def heldout(llama):
    _, cfg = llama
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 2, SEQ + 1)).astype(np.int32)
    return [{"inputs": r[:, :-1], "targets": r[:, 1:], "loss_mask": np.ones((2, SEQ), np.float32)} for r in ids]


def masked_stats(logits, batch):
    """(perplexity, greedy accuracy) at the batch's loss-mask positions, from full logits."""
    m = np.asarray(batch["loss_mask"], bool)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return float(np.exp(nll[m].mean())), float((logp.argmax(-1)[m] == batch["targets"][m]).mean())


def test_alternating_is_odd_layers(llama):
    model, cfg = llama
    assert select_layers("alternating", model, cfg) == [1, 3]
    assert select_layers("alternating", model, cfg.replace(num_layers=7)) == [1, 3, 5]
    with pytest.raises(ValueError, match="num_ssm=3 disagrees"):
        select_layers("alternating", model, cfg, num_ssm=3)


def test_list_is_validated(llama):
    model, cfg = llama
    assert select_layers("list", model, cfg, layers=(3, 0)) == [0, 3]
    assert select_layers("list", model, cfg, layers=[]) == []
    for layers, message in [([1, 4], "layer index 4 is outside 0..3"), ([-1], "layer index -1 is outside"),
                            ([2, 1, 2], "layer index 2 is listed twice"), ([1.0], "1.0 is not an integer"),
                            ([True], "True is not an integer"), (range(5), "5 SSM layers listed")]:
        with pytest.raises(ValueError, match=message):
            select_layers("list", model, cfg, layers=layers)
    with pytest.raises(ValueError, match="num_ssm=1 disagrees"):
        select_layers("list", model, cfg, layers=[0, 1], num_ssm=1)


def test_unknown_method_lists_the_options(llama):
    with pytest.raises(ValueError, match=r"'random'.*\('alternating', 'list', 'importance'\)"):
        select_layers("random", *llama)


def test_recall_batches_format():
    task = RecallTask(seq_len=100, num_queries=5, num_sequences=3)
    (batch,) = recall_batches(task, vocab_size=1000, seed=7)
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    assert inputs.shape == targets.shape == mask.shape == (3, 100)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])  # targets are the next tokens
    assert (mask.sum(1) == 5).all() and set(np.unique(mask)) == {0, 1}
    assert inputs.min() >= 100 and inputs.max() < 500  # the default pool: the band [vocab/10, vocab/2)
    for row_in, row_t, row_m in zip(inputs, targets, mask):
        for p in np.flatnonzero(row_m):
            first = np.flatnonzero(row_in == row_t[p])[0]  # where the queried value was stated
            assert (row_in[first - 2:first] == row_in[p - 1:p + 1]).all()  # after the same two-token key
            assert p - first >= task.min_distance
    again = recall_batches(task, vocab_size=1000, seed=7)[0]
    assert all((again[k] == batch[k]).all() for k in batch)
    assert not (recall_batches(task, vocab_size=1000, seed=8)[0]["inputs"] == inputs).all()


def test_recall_batches_separator_and_errors():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [ord(c) for c in text]

    task = recall_task_for(Tok(), seq_len=50, num_queries=2, num_sequences=1)
    assert task.separator == (ord(","), ord("\n"))
    (batch,) = recall_batches(task, vocab_size=2000)
    seps = batch["inputs"][0] == ord(",")
    assert seps.sum() == task.num_pairs + task.num_queries - 1
    assert (batch["inputs"][0][np.flatnonzero(seps) + 1] == ord("\n")).all()
    with pytest.raises(ValueError, match="num_queries must be in 1..2"):
        recall_batches(RecallTask(seq_len=40, num_queries=3), vocab_size=1000)
    with pytest.raises(ValueError, match="needs .* distinct token ids"):
        recall_batches(RecallTask(seq_len=256), vocab_size=128)


def test_probe_changes_only_its_layer(llama, heldout):
    """The probe shares the source's arrays and equals a model built with that window directly; positions the
    window cannot cut off are untouched."""
    model, cfg = llama
    probe = probe_model(model, cfg, 2, window=16)
    assert probe.layers[2].mixer.q[...] is model.layers[2].mixer.q[...]
    assert [b.mixer.window for b in probe.layers] == [None, None, 16, None]
    direct = fill_model(abstract_model(cfg.replace(sliding_windows=(None, None, 16, None))),
                        {k: jnp.array(v, copy=True) for k, v in param_values(model).items()})
    tokens = heldout[0]["inputs"]
    got, want, base = (np.asarray(jitted(m)(tokens)) for m in (probe, direct, model))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got[:, :16], base[:, :16], rtol=1e-6, atol=1e-6)
    assert np.abs(got[:, 16:] - base[:, 16:]).max() > 1e-3


def test_importance_matches_full_forward_of_each_probe(llama, heldout):
    """The layer-by-layer evaluation (source states reused below layer l) equals each probe model's forward."""
    model, cfg = llama
    res = importance_scores(model, cfg, heldout_batches=heldout, window=8, recall=TASK, seed=3)
    recall = recall_batches(TASK, cfg.vocab_size, seed=3)[0]
    for layer, net in [(None, model)] + [(i, probe_model(model, cfg, i, 8)) for i in range(cfg.num_layers)]:
        forward = jitted(net)
        logits = np.concatenate([np.asarray(forward(b["inputs"])) for b in heldout])
        ppl, _ = masked_stats(logits, {k: np.concatenate([b[k] for b in heldout]) for k in heldout[0]})
        _, acc = masked_stats(np.asarray(forward(recall["inputs"])), recall)
        want = (res["base_ppl"], res["base_recall"]) if layer is None else (res["ppl"][layer], res["recall"][layer])
        np.testing.assert_allclose(want, (ppl, acc), rtol=1e-5)


def test_importance_selection(llama, heldout):
    model, cfg = llama
    chosen = select_layers("importance", model, cfg, heldout_batches=heldout, window=8, recall=TASK, seed=1)
    assert len(chosen) == len(set(chosen)) == 2 and chosen == sorted(chosen)
    assert all(0 <= i < cfg.num_layers for i in chosen)
    res = importance_scores(model, cfg, heldout_batches=heldout, window=8, recall=TASK, seed=1)
    assert chosen == most_replaceable(res["score"], 2)
    assert res == {**importance_scores(model, cfg, heldout_batches=heldout, window=8, recall=TASK, seed=1),
                   "seconds": res["seconds"]}
    assert res["score"] == replaceability(res["ppl"], res["base_ppl"], res["recall"], res["base_recall"])
    assert select_layers("importance", model, cfg, num_ssm=3, heldout_batches=heldout, window=8, recall=None) \
        == most_replaceable(importance_scores(model, cfg, heldout_batches=heldout, window=8, recall=None)["score"], 3)


def test_replaceability_formula():
    ppl, recall = [10.0, 10.0 * np.e, 10.0 * np.e**2], [0.5, 0.5, 0.2]
    z_ppl, z_rec = np.array([-1, 0, 1]) * np.sqrt(1.5), (np.array([0, 0, 0.3]) - 0.1) / np.sqrt(0.02)
    np.testing.assert_allclose(replaceability(ppl, 10.0, recall, 0.6), -(z_ppl + z_rec) / 2, atol=1e-12)
    np.testing.assert_allclose(replaceability(ppl, 10.0, None, None), -z_ppl, atol=1e-12)
    np.testing.assert_allclose(replaceability(None, None, recall, 0.6), -z_rec, atol=1e-12)
    assert replaceability([2.0, 2.0], 1.0, None, None) == [0.0, 0.0]  # no spread: nothing to tell apart
    assert most_replaceable([0.5, 2.0, 0.5, -1.0], 2) == [0, 1]  # ties go to the lower index


def test_window_covering_the_sequence_changes_nothing(llama, heldout):
    model, cfg = llama
    with pytest.warns(UserWarning, match="recall cannot tell the layers apart"):
        res = importance_scores(model, cfg, heldout_batches=heldout, window=SEQ, recall=TASK)
    assert res["ppl"] == [res["base_ppl"]] * cfg.num_layers
    assert res["recall"] == [res["base_recall"]] * cfg.num_layers
    assert res["score"] == [0.0] * cfg.num_layers


def test_importance_errors(llama, heldout):
    model, cfg = llama
    with pytest.raises(ValueError, match="needs held-out batches, a recall task, or both"):
        importance_scores(model, cfg, heldout_batches=None, recall=None)
    with pytest.raises(ValueError, match="no scored tokens"):
        importance_scores(model, cfg, heldout_batches=[dict(heldout[0], loss_mask=0 * heldout[0]["loss_mask"])])
    with pytest.raises(ValueError, match="num_ssm=5 is outside 0..4"):
        select_layers("importance", model, cfg, num_ssm=5, heldout_batches=heldout)
    with pytest.raises(ValueError, match="already a hybrid"):
        importance_scores(model, cfg.replace(ssm=priming_jax.config.SSMConfig(("attention", "gdn") * 2)),
                          heldout_batches=heldout)


def test_smollm2_recalls_far_back_pairs_only_with_full_attention():
    """The recall task is hard but doable for the real model, and out of reach once attention is windowed."""
    from priming_jax.gguf_io import default_smollm2_gguf

    path = default_smollm2_gguf()
    model, cfg = priming_jax.load(path)
    task = recall_task_for(priming_jax.load_tokenizer(path), num_sequences=2)
    (batch,) = recall_batches(task, cfg.vocab_size)
    windowed = fill_model(abstract_model(cfg.replace(sliding_windows=(64,) * cfg.num_layers)), param_values(model))
    assert task.min_distance > 64
    _, full = masked_stats(np.asarray(jitted(model)(batch["inputs"])), batch)
    _, short = masked_stats(np.asarray(jitted(windowed)(batch["inputs"])), batch)
    assert full >= 0.5 and short <= 0.1, (full, short)
