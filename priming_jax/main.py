"""The main job. Until the priming stages land, it converts the bundled SmolLM2-135M-Instruct GGUF to our Orbax
format (once, into the workdir), reloads it from Orbax, reports its next-token loss on a Shakespeare sonnet
and continues a Shakespeare line.

    python -m priming_jax.main [--source PATH] [--workdir DIR] [--prompt TEXT] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

# Sonnet 18 (1609), public domain.
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


def next_token_loss(model, tokens: np.ndarray) -> float:
    """Mean cross-entropy (nats/token) of predicting tokens[1:] from their prefixes."""
    import jax

    logits = model(jnp.asarray(tokens[None, :-1])).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    return float(-jnp.take_along_axis(logp, jnp.asarray(tokens[None, 1:, None]), -1).mean())


def run(source: Path, workdir: Path, prompt: str, max_new_tokens: int) -> dict:
    from priming_jax.checkpoint import load, load_tokenizer
    from priming_jax.convert import gguf_to_orbax, hf_to_orbax
    from priming_jax.generate import generate

    start = time.time()
    orbax_dir = workdir / "source_orbax"
    if not orbax_dir.exists():
        print(f"converting {source} -> {orbax_dir}")
        (gguf_to_orbax if source.is_file() else hf_to_orbax)(source, orbax_dir)
    model, cfg = load(orbax_dir)
    tokenizer = load_tokenizer(orbax_dir)
    print(f"loaded {cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}")

    sonnet = np.asarray(tokenizer(SONNET_18)["input_ids"], np.int32)
    loss = next_token_loss(model, sonnet)
    print(f"next-token loss on Sonnet 18 ({len(sonnet)} tokens): {loss:.4f} nats/token "
          f"(perplexity {np.exp(loss):.2f})")

    ids = np.asarray([tokenizer(prompt)["input_ids"]], np.int32)
    out = generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\n{prompt}{continuation}\n")
    report = {"source": str(source), "sonnet_tokens": int(len(sonnet)), "sonnet_loss": loss,
              "prompt": prompt, "continuation": continuation, "wall_s": round(time.time() - start, 1)}
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    from priming_jax.files import CheckpointError
    from priming_jax.gguf_io import default_smollm2_gguf

    parser = argparse.ArgumentParser(prog="python -m priming_jax.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="HF folder or GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--workdir", type=Path, default=Path("workdir/smollm2"))
    parser.add_argument("--prompt", default="Shall I compare thee to a summer's day?\n")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    try:
        source = args.source or default_smollm2_gguf()
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = run(source, args.workdir, args.prompt, args.max_new_tokens)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {args.workdir / 'report.json'} (wall {report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
