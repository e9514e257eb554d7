"""The Priming run: prime -> align -> posttrain -> eval, each stage resumable, with a report at the end.

workdir/
  config.json           the resolved config of the run
  prime/                Orbax hybrid after Stage 0 (weight transfer)
  align/ckpt, align/model, posttrain/ckpt, posttrain/model
  metrics/              metrics.jsonl and TensorBoard events
  evals.json            held-out perplexities as they are measured (reruns reuse them)
  loss_curve.png, report.md, report.json
A stage whose model folder exists is skipped; one that was interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from priming_jax.checkpoint import load, load_tokenizer, save
from priming_jax.config import ModelConfig, SSMConfig
from priming_jax.files import CheckpointError
from priming_jax.hf_io import param_values
from priming_jax.hybrid import alternating, layer_types_for, prime
from priming_jax.metrics import MetricsWriter
from priming_jax.train import LossSpec, perplexity, train_stage
from priming_jax.transformer import abstract_model

STAGES = ("prime", "align", "posttrain", "eval")


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"config.stages={text!r}: unknown stage(s) {bad}; choose from {STAGES}")
    return [s for s in STAGES if s in stages]


def resolve_source(config) -> Path:
    if not config.source:
        from priming_jax.gguf_io import default_smollm2_gguf

        return default_smollm2_gguf()
    path = Path(config.source)
    if not path.exists():
        raise CheckpointError(
            f"config.source={config.source!r} is not a file or folder on this machine; priming-jax never "
            "downloads: fetch the checkpoint yourself (e.g. `huggingface-cli download ID --local-dir DIR`) "
            "and pass --config.source=DIR"
        )
    return path


def ssm_config(config, num_layers: int, ssm_layers) -> SSMConfig:
    h = config.hybrid
    return SSMConfig(layer_types_for(num_layers, ssm_layers, h.kind), conv_width=h.conv_width,
                     gka_num_iter=h.gka_num_iter, gka_ridge_strength=h.gka_ridge_strength,
                     chunk_size=h.chunk_size, impl=h.impl)


def num_params(model) -> int:
    return sum(int(np.prod(v.shape)) for v in param_values(model).values())


def dry_run(config) -> dict:
    """Build source and hybrid abstractly (nothing allocated) and print parameter counts and the plan."""
    path = Path(config.source) if config.source else None
    if path is not None and (path / "config.json").is_file():
        cfg = ModelConfig.from_json(path / "config.json")
    elif config.source_config:
        cfg = ModelConfig.from_hf(config.source_config.to_dict(), source="config.source_config")
    else:
        raise CheckpointError("dry_run needs config.source with a config.json or config.source_config")
    n = cfg.num_layers
    if config.hybrid.selection == "list":
        ssm_layers = sorted(config.hybrid.layers)
    else:  # importance needs the weights; the dry run counts parameters for the alternating pattern
        ssm_layers = alternating(n)
    hcfg = cfg.replace(ssm=ssm_config(config, n, ssm_layers))
    source, hybrid = num_params(abstract_model(cfg)), num_params(abstract_model(hcfg))
    plan = {"source_params": source, "hybrid_params": hybrid, "ssm_layers": ssm_layers,
            "added_params": hybrid - source, "kind": config.hybrid.kind}
    for stage in ("align", "posttrain"):
        s = config[stage]
        tokens = s.steps * s.batch_size * (s.get("seq_len") or config.data.seq_len)
        plan[f"{stage}_tokens"] = tokens
        if config.source_pretraining_tokens:
            plan[f"{stage}_pct_of_pretraining"] = 100 * tokens / config.source_pretraining_tokens
    print(f"source {cfg.architecture}: {source:,} parameters ({source / 1e9:.3f} B)")
    print(f"hybrid ({config.hybrid.kind} at layers {ssm_layers}): {hybrid:,} parameters "
          f"({hybrid - source:+,} vs source)")
    for stage in ("align", "posttrain"):
        pct = plan.get(f"{stage}_pct_of_pretraining")
        print(f"{stage}: {plan[f'{stage}_tokens']:,} tokens" + (f" ({pct:.3f} % of pretraining)" if pct else ""))
    return plan


class Run:
    """State shared by the stages of one run."""

    def __init__(self, config):
        self.config = config
        self.workdir = Path(config.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsWriter(self.workdir / "metrics")
        self.evals_path = self.workdir / "evals.json"
        self.evals = json.loads(self.evals_path.read_text()) if self.evals_path.exists() else {}
        self.tokens = {}
        self.start = time.time()

    def eval(self, name: str, model, batches) -> float:
        if name not in self.evals:
            t = time.time()
            self.evals[name] = perplexity(model, batches)
            print(f"held-out perplexity, {name}: {self.evals[name]:.3f} ({time.time() - t:.0f} s)")
            self.evals_path.write_text(json.dumps(self.evals, indent=2))
        return self.evals[name]


def check_inputs(config, cfg: ModelConfig, tokenizer) -> None:
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {cfg.vocab_size}: "
                         "they do not belong together (check config.source)")
    seq = config.data.seq_len
    if seq < 2:
        raise ValueError(f"config.data.seq_len={seq}: needs at least 2 tokens (an input and a target)")
    if seq > cfg.max_position_embeddings:
        raise ValueError(f"config.data.seq_len={seq} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    if config.hybrid.impl == "pallas" and seq % config.hybrid.chunk_size:
        raise ValueError(f"config.data.seq_len={seq} is not a multiple of hybrid.chunk_size="
                         f"{config.hybrid.chunk_size}, which the Pallas kernels need")


def run(config) -> dict:
    stages = parse_stages(config.stages)
    if config.dry_run:
        return dry_run(config)
    r = Run(config)
    (r.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    source = resolve_source(config)
    teacher, cfg = load(source)
    tokenizer = load_tokenizer(source)
    check_inputs(config, cfg, tokenizer)
    from priming_jax import data as data_lib

    d = config.data
    corpus = data_lib.build_corpus(tuple(d.sources) or data_lib.default_sources(d.corpus_dir), tokenizer,
                                   d.cache_dir, heldout_fraction=d.heldout_fraction)
    heldout = list(data_lib.heldout_batches(corpus, d.seq_len, d.eval_batch_size, max_batches=d.eval_batches))

    prime_dir = r.workdir / "prime"
    if prime_dir.exists():
        hybrid, hcfg = load(prime_dir)
    elif "prime" in stages:
        from priming_jax.selection import recall_task_for, select_layers

        # the probe runs ~L²/2 blocks per batch: two held-out batches are enough to rank the layers
        layers = select_layers(config.hybrid.selection, teacher, cfg, ratio=config.hybrid.ratio,
                               layers=tuple(config.hybrid.layers), heldout_batches=heldout[:2],
                               window=config.hybrid.probe_window, recall=recall_task_for(tokenizer),
                               seed=config.seed)
        hybrid, hcfg = prime(teacher, cfg, ssm_config(config, cfg.num_layers, layers), seed=config.seed)
        save(hybrid, hcfg, prime_dir, tokenizer=tokenizer)
        print(f"primed: {config.hybrid.kind} at layers {layers} -> {prime_dir}")
    else:
        raise CheckpointError(f"{prime_dir} does not exist: run the 'prime' stage first")

    teacher_ppl = r.eval("teacher", teacher, heldout)
    r.eval("init", hybrid, heldout)
    model = hybrid
    for stage in ("align", "posttrain"):
        model_dir = r.workdir / stage / "model"
        if model_dir.exists():
            model, _ = load(model_dir)
        elif stage in stages:
            model = train_one(r, stage, model, teacher, hcfg, corpus, tokenizer)
            save(model, hcfg, model_dir, tokenizer=tokenizer)
        else:
            continue
        r.eval(stage, model, heldout)
    return write_report(r, teacher_ppl)


def train_one(r: Run, stage: str, model, teacher, hcfg: ModelConfig, corpus, tokenizer):
    config = r.config
    s = config[stage]
    seq_len = s.get("seq_len") or config.data.seq_len
    spec = LossSpec("align" if stage == "align" else "ntp", align_target=s.target, kl_weight=s.kl_weight,
                    ssm_layers=tuple(hcfg.ssm.ssm_layers))
    from priming_jax import data as data_lib

    def data_iter():
        pid, pcount = jax.process_index(), jax.process_count()
        if stage == "posttrain" and s.data == "sft":
            return data_lib.sft_iterator(tuple(config.data.sft_sources), tokenizer, seq_len, s.batch_size,
                                         seed=config.seed, process_index=pid, process_count=pcount)
        return data_lib.train_iterator(corpus, seq_len, s.batch_size, seed=config.seed + (stage == "posttrain"),
                                       process_index=pid, process_count=pcount)

    result = train_stage(stage, model, teacher, spec, s, config.train, seq_len, data_iter,
                         r.workdir / stage / "ckpt", r.metrics, source_tokens=config.source_pretraining_tokens or None)
    r.tokens[stage] = result.tokens
    return result.model


def write_report(r: Run, teacher_ppl: float) -> dict:
    config, ev = r.config, r.evals
    final_name = "posttrain" if "posttrain" in ev else ("align" if "align" in ev else "init")
    init, final = ev["init"], ev[final_name]
    gap = init - teacher_ppl
    gap_closed = (init - final) / gap if gap > 0 else float("nan")
    tokens = {stage: config[stage].steps * config[stage].batch_size * (config[stage].get("seq_len")
                                                                        or config.data.seq_len)
              for stage in ("align", "posttrain") if stage in ev}
    report = {
        "perplexity": {"teacher": teacher_ppl, "init": init, **{k: ev[k] for k in ("align", "posttrain") if k in ev}},
        "gap_closed": gap_closed,
        "final_stage": final_name,
        "tokens": tokens,
        "tokens_total": sum(tokens.values()),
        "wall_s": round(time.time() - r.start, 1),
        "config": json.loads(config.to_json_best_effort()),
    }
    if config.source_pretraining_tokens:
        report["pct_of_pretraining"] = 100 * report["tokens_total"] / config.source_pretraining_tokens
    png = r.metrics.plot(r.workdir / "loss_curve.png")
    (r.workdir / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Priming report: {config.hybrid.kind}, {r.workdir}",
        "",
        "| model | held-out perplexity |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in report["perplexity"].items()],
        "",
        f"gap closed: **{gap_closed:.3f}** = (ppl_init − ppl_{final_name}) / (ppl_init − ppl_teacher)",
        "",
        "tokens: " + ", ".join(f"{k} {v:,}" for k, v in tokens.items()) + f" (total {report['tokens_total']:,}"
        + (f", {report['pct_of_pretraining']:.5f} % of the source's pretraining)" if "pct_of_pretraining" in report
           else ")"),
        "",
        f"wall time of this invocation: {report['wall_s']} s",
        "",
        f"![loss curve]({png.name})" if png else "",
        "",
        "## config",
        "```json",
        json.dumps(report["config"], indent=2),
        "```",
    ]
    (r.workdir / "report.md").write_text("\n".join(lines))
    print(f"gap closed {gap_closed:.3f}: perplexity teacher {teacher_ppl:.3f}, init {init:.3f}, "
          f"{final_name} {final:.3f}; report in {r.workdir / 'report.md'}")
    if not math.isfinite(gap_closed):
        print("note: the hybrid at init was not worse than the teacher; gap_closed is undefined")
    return report
