"""SSM sequence ops (simple GLA / SSD, Gated DeltaNet, GKA, causal conv1d): reference, chunked and decode forms."""

from pallas_kernels.conv1d import causal_conv1d, causal_conv1d_step
from pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from pallas_kernels.gka import gka, gka_step
from pallas_kernels.simple_gla import simple_gla, simple_gla_step

__all__ = [
    "causal_conv1d",
    "causal_conv1d_step",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gka",
    "gka_step",
    "simple_gla",
    "simple_gla_step",
]
