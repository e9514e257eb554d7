"""Run Priming: `python -m priming_jax.main --config=configs/NAME.py [--config.key=value ...]`.

With no --config it runs configs/smollm2_gka.py: SmolLM2-135M-Instruct (bundled) -> 50 % GKA hybrid, on CPU.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_gka.py"


def _explain_bad_override(argv: list[str], error: Exception) -> str:
    """Name the --config.KEY that does not exist and the keys that do at that level."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), str(DEFAULT_CONFIG))
    spec = importlib.util.spec_from_file_location("run_config", path)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception:  # the config file itself is broken: the original error says why
        return str(error)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node = config
        for key in arg[len("--config."):].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or key not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a group)"
                return f"{arg}: no key {key!r} in the config; keys there: {known}"
            node = node[key]
    return str(error)


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run. config_flags applies the --config.* overrides from the process's own command line
    (already when the flag is defined, hence here), so this is a CLI entry point: run it as
    `python -m priming_jax.main` (the tests use a subprocess)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        config = config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Run configuration (ml_collections).",
                                                 lock_config=True)
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {_explain_bad_override(argv, e)}", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}; settings go in --config.KEY=VALUE", file=sys.stderr)
        return 2

    from priming_jax.files import CheckpointError
    from priming_jax.pipeline import run
    from priming_jax.train import Interrupted

    try:
        run(config.value)
    except Interrupted as e:
        print(f"{e}; rerun the same command to resume", file=sys.stderr)
        return 143
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
