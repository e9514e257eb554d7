"""HF -> Orbax -> HF round trips are bit-identical, the export loads in transformers, and bad input fails clearly."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import priming_jax
from priming_jax.convert import main as convert
from tests.conftest import tiny_hf_model


def read_all(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    return tensors


@pytest.mark.parametrize("family,dtype,shards", [("llama", None, 1), ("qwen3", torch.bfloat16, 1),
                                                 ("qwen3_moe", None, 2), ("qwen2", torch.bfloat16, 2)])
def test_round_trip_bit_identical(tmp_path, family, dtype, shards):
    hf = tiny_hf_model(family, dtype=dtype)
    src, orbax, back = tmp_path / "hf", tmp_path / "orbax", tmp_path / "back"
    total = sum(p.numel() * p.element_size() for p in hf.parameters())
    shard_size = str(int(total * 0.6)) if shards == 2 else "5GB"
    hf.save_pretrained(src, max_shard_size=int(shard_size) if shards == 2 else shard_size)
    assert len(list(src.glob("*.safetensors"))) == shards
    assert convert(["hf-to-orbax", str(src), str(orbax)]) == 0
    assert convert(["orbax-to-hf", str(orbax), str(back), "--max-shard-size", shard_size]) == 0
    assert len(list(back.glob("*.safetensors"))) == shards
    a, b = read_all(src), read_all(back)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs after the round trip"
    # transformers itself loads the export and computes the same logits
    import transformers

    def hf_logits(folder):
        m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32,
                                                              attn_implementation="eager")
        with torch.no_grad():
            return m(torch.arange(24).reshape(2, 12) % hf.config.vocab_size).logits

    assert torch.equal(hf_logits(back), hf_logits(src))


def test_orbax_keeps_bf16(tmp_path):
    hf = tiny_hf_model("llama", dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = priming_jax.load(tmp_path / "hf")
    priming_jax.save(model, cfg, tmp_path / "orbax")
    again, _ = priming_jax.load(tmp_path / "orbax")
    assert str(again.layers[0].mixer.q.get_value().dtype) == "bfloat16"
    assert cfg.dtype == "bfloat16"


def test_pytorch_bin_checkpoint(tmp_path):
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path, safe_serialization=False) if _bin_supported() else _save_bin(hf, tmp_path)
    model, _ = priming_jax.load(tmp_path)
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    assert np.abs(np.asarray(model(ids.numpy())) - ref).max() <= 1e-4


def _bin_supported():
    import inspect

    import transformers

    return "safe_serialization" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def _save_bin(hf, folder):
    folder.mkdir(exist_ok=True)
    hf.config.save_pretrained(folder)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------ errors


@pytest.fixture
def hf_dir(tmp_path):
    folder = tmp_path / "hf"
    tiny_hf_model("llama").save_pretrained(folder)
    return folder


def rewrite(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def expect_error(path, *fragments):
    with pytest.raises(ValueError) as info:
        priming_jax.load(path)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_unknown_architecture(hf_dir):
    edit_config(hf_dir, model_type="gpt_bigcode")
    expect_error(hf_dir, "gpt_bigcode", "config.json")


def test_missing_tensor(hf_dir):
    rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(hf_dir, "missing", "model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(hf_dir):
    rewrite(hf_dir, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros((2, 2), np.float32)}))
    expect_error(hf_dir, "unexpected", "model.layers.0.self_attn.extra.weight", "model.safetensors")


def test_wrong_shape(hf_dir):
    rewrite(hf_dir, lambda t: t.update({"model.norm.weight": np.ones((63,), np.float32)}))
    expect_error(hf_dir, "model.norm.weight", "(63,)", "(64,)")


def test_config_weights_mismatch(hf_dir):
    edit_config(hf_dir, num_hidden_layers=1)
    expect_error(hf_dir, "unexpected", "model.layers.1.", "1 layers")


def test_unreadable_files(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    expect_error(hf_dir, "model.safetensors")
    (hf_dir / "config.json").write_text("{not json")
    expect_error(hf_dir, "config.json")
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"nonsense")
    expect_error(junk, "weights.bin")
    expect_error(tmp_path / "nowhere", "nowhere", "never downloads")


def test_failed_conversion_leaves_nothing(hf_dir, tmp_path, capsys):
    rewrite(hf_dir, lambda t: t.pop("model.norm.weight"))
    dst = tmp_path / "out"
    assert convert(["hf-to-orbax", str(hf_dir), str(dst)]) == 1
    assert "model.norm.weight" in capsys.readouterr().err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "a partial output was left"
