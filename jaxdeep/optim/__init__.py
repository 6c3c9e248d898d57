"""Optimiser-side pieces beyond optax: top-k gradient compression with error feedback (see README.md)."""

from jaxdeep.optim.build import build_compression, topk_options
from jaxdeep.optim.plan import ReplicaPlan, make_plan, replica_axes_of
from jaxdeep.optim.reduction import CompressedReduction, compressed_reduction
from jaxdeep.optim.topk import TopkOptions, TopkState, topk_compression

__all__ = [
    "CompressedReduction",
    "ReplicaPlan",
    "TopkOptions",
    "TopkState",
    "build_compression",
    "compressed_reduction",
    "make_plan",
    "replica_axes_of",
    "topk_compression",
    "topk_options",
]
