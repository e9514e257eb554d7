"""Configuration of a Priming run (ml_collections), shared by the files in `configs/`.

Every key is documented where it is set. `configs/*.py` start from `base_config()` and change what their
recipe needs; any key can be overridden on the command line (`--config.align.lr=3e-4`).
"""

from __future__ import annotations

import ml_collections


def stage_config(**overrides) -> ml_collections.ConfigDict:
    """One training stage (align or posttrain)."""
    c = ml_collections.ConfigDict()
    c.steps = 100  # optimizer steps
    c.batch_size = 8  # sequences per step (split into grad_accum micro-batches)
    c.grad_accum = 1
    c.lr = 1e-4
    c.schedule = "constant"  # constant | cosine | linear, after linear warm-up
    c.warmup_steps = 10
    c.grad_clip = 1.0
    c.b1, c.b2 = 0.9, 0.95
    c.weight_decay = 0.0
    c.trainable = ("ssm",)  # name patterns: ssm | attention | norms | mlp | embeddings | all | a regex
    c.kl_weight = 0.0  # align: KL on logits; posttrain: distillation from the teacher
    c.target = "final_hidden"  # align only: final_hidden | mixer | block | local_mixer
    c.data = "text"  # posttrain only: text | sft (chat JSONL in data.sft_sources)
    c.seq_len = 0  # 0 = data.seq_len
    c.update(overrides)
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = ""  # HF folder, .gguf file or Orbax checkpoint of ours; "" = the bundled SmolLM2-135M-Instruct
    c.workdir = "workdir/run"  # checkpoints, metrics, report
    c.stages = "prime,align,posttrain,eval"  # any subset, run in this order
    c.seed = 0
    c.dry_run = False  # build the source and hybrid abstractly, print parameter counts and the plan, exit
    c.source_pretraining_tokens = 0.0  # the source's pretraining budget, to report tokens as a percentage
    c.source_config = ml_collections.ConfigDict()  # config.json facts, used when `source` is not on disk (dry run)

    c.hybrid = ml_collections.ConfigDict()
    c.hybrid.kind = "gka"  # gka | gdn | mamba2
    c.hybrid.selection = "alternating"  # alternating | list | importance
    c.hybrid.layers = ()  # for selection = list
    c.hybrid.ratio = 0.5  # fraction of layers that become SSMs
    c.hybrid.gka_num_iter = 30
    c.hybrid.gka_ridge_strength = 0.02
    c.hybrid.chunk_size = 64
    c.hybrid.impl = "auto"  # auto | chunked | reference | pallas
    c.hybrid.conv_width = 4
    c.hybrid.probe_window = 64  # importance selection: sliding window of the probe

    c.data = ml_collections.ConfigDict()
    c.data.sources = ()  # () = the default public-domain corpus (Shakespeare + KJV), see priming_jax.data
    c.data.corpus_dir = "data/corpus"
    c.data.cache_dir = "data/cache"
    c.data.seq_len = 256
    c.data.heldout_fraction = 0.02
    c.data.eval_batches = 8
    c.data.eval_batch_size = 8
    c.data.sft_sources = ()

    c.train = ml_collections.ConfigDict()
    c.train.compute_dtype = "bfloat16"
    c.train.remat = False
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2
    c.train.log_every = 5

    c.align = stage_config()
    c.posttrain = stage_config(trainable=("ssm", "norms", "attention"), schedule="cosine", lr=5e-5)
    return c


def smollm2_config(kind: str) -> ml_collections.ConfigDict:
    """The CPU default: bundled SmolLM2-135M-Instruct -> 50 % hybrid of `kind` on public-domain text."""
    c = base_config()
    c.workdir = f"workdir/smollm2_{kind}"
    c.source_pretraining_tokens = 2e12  # SmolLM2-135M was pretrained on 2T tokens
    c.hybrid.kind = kind
    c.hybrid.gka_num_iter = 10
    c.data.seq_len = 256
    c.data.eval_batches = 4
    c.train.log_every = 1
    c.train.compute_dtype = "float32"  # XLA:CPU runs bf16 matmuls far slower than fp32
    # Sized for ≤ 25 minutes on 2 CPU cores (≈ 10 s per align step, ≈ 25 s per posttrain step of 2048 tokens).
    c.align.update(steps=30, batch_size=8, lr=3e-3, warmup_steps=3, target="local_mixer")
    c.posttrain.update(steps=25, batch_size=8, lr=3e-4, warmup_steps=3)
    return c


def qwen3_8b_facts() -> dict:
    """Qwen3-8B's config.json (the public values), for dry runs without the checkpoint on disk."""
    return dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=4096,
                intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                tie_word_embeddings=False, attention_bias=False, torch_dtype="bfloat16")


def qwen3_32b_facts() -> dict:
    """Qwen3-32B's config.json (the public values)."""
    return {**qwen3_8b_facts(), "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
            "num_attention_heads": 64}


# SPEC §3: the paper's importance-selected SSM layers for Qwen3-8B (attention kept in the middle block).
QWEN3_8B_SSM_LAYERS = (1, 2, 3, 4, 5, 6, 9, 10, 11, 26, 27, 28, 30, 31, 32, 33, 34, 35)


def qwen3_8b_config(kind: str) -> ml_collections.ConfigDict:
    """Qwen3-8B -> 50 % hybrid of `kind` with the release recipe; `source` must be a local HF folder."""
    c = release_recipe(base_config())
    c.source = "Qwen/Qwen3-8B"  # replace by the local folder of the downloaded checkpoint
    c.source_config = ml_collections.ConfigDict(qwen3_8b_facts())
    c.workdir = f"workdir/qwen3_8b_{kind}"
    c.hybrid.kind = kind
    c.hybrid.selection = "list"
    c.hybrid.layers = QWEN3_8B_SSM_LAYERS
    return c


def release_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """SPEC §8: the release's 8B schedule (Stage 1 ≈ 40B tokens, Stage 2 long-context ≈ 28B tokens)."""
    c.source_pretraining_tokens = 36e12
    c.train.remat = True
    c.train.checkpoint_every = 500
    c.train.log_every = 10
    c.data.seq_len = 8192
    c.align.update(steps=19_000, batch_size=256, lr=1e-4, schedule="constant", warmup_steps=720)
    # Long-context continued pretraining: 48 × 131072 tokens ≈ 6.29M per step (RoPE θ 5e6 in the release).
    c.posttrain.update(steps=4_480, batch_size=48, lr=5e-5, schedule="cosine", warmup_steps=224,
                       trainable=("ssm", "norms", "attention"), seq_len=131_072)
    c.hybrid.chunk_size = 64
    return c
