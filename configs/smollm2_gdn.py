"""SmolLM2-135M-Instruct (bundled GGUF) -> 50 % gdn hybrid on public-domain text, sized for a 2-core CPU."""

from priming_jax.recipe import smollm2_config


def get_config():
    return smollm2_config("gdn")
