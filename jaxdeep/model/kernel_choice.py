"""Which kernels and which matmul precision a model runs with, as one value the model constructors take.

`KernelChoice.from_config(cfg)` reads the experiment config's `kernels` and `precision` sections; the defaults
are those of the config. The choice changes how a model computes, never its parameters: any choice gives the
same parameter tree, so a checkpoint written under one loads under another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxdeep.config import ExperimentConfig

Matmul = Literal["bf16", "fp8"]
MATMULS = ("bf16", "fp8")
FP8_DOWN_INPUTS = ("recompute", "keep")


def check_matmul(matmul: str) -> str:
    if matmul not in MATMULS:
        raise ValueError(f"precision.matmul must be one of {MATMULS}, got {matmul!r}")
    return matmul


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """The kernel implementations and the matmul precision of a model (frozen: a static part of its graph)."""

    # kernels.norm: the LayerNorms / RMSNorms (`kernels.norms`): "reference", "fused" or "auto"
    norm: str = "reference"
    # kernels.gmm: the routed experts' grouped matmuls in the compute dtype (`kernels.gmm`)
    gmm: str = "auto"
    # precision.matmul: the projections and the routed experts' grouped matmuls in "bf16" (the compute dtype)
    # or "fp8"; the embedding, output head, norms and router stay in higher precision either way
    matmul: Matmul = "bf16"
    # kernels.fp8: the FP8 kernels when matmul is "fp8" (`kernels.fp8`)
    fp8: str = "auto"
    # precision.fp8_down_input: "recompute" or "keep" the FP8 input of the MLPs' down projections (`matmul.py`)
    fp8_down_input: str = "recompute"

    def __post_init__(self):
        check_matmul(self.matmul)
        if self.fp8_down_input not in FP8_DOWN_INPUTS:
            raise ValueError(f"precision.fp8_down_input must be one of {FP8_DOWN_INPUTS}, got {self.fp8_down_input!r}")

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> KernelChoice:
        """The choice of `cfg.kernels` and `cfg.precision`."""
        p = cfg.precision
        return cls(
            norm=cfg.kernels.norm, gmm=cfg.kernels.gmm, matmul=p.matmul, fp8=cfg.kernels.fp8,
            fp8_down_input=p.fp8_down_input,
        )  # fmt: skip


DEFAULT_KERNELS = KernelChoice()  # the config's defaults; the default argument of the constructors and helpers


def check_kernels(kernels: object) -> KernelChoice:
    """`kernels` itself, or a TypeError for anything else (such as the separate strings models once took)."""
    if not isinstance(kernels, KernelChoice):
        raise TypeError(f"kernels must be a KernelChoice (e.g. KernelChoice.from_config(cfg)), got {kernels!r}")
    return kernels
