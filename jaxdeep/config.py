"""Experiment configuration: typed dataclasses loaded from YAML, overridable as `section.key=value`.

This module must not import jax: the CLI reads the config before jax starts (to set up simulated
CPU devices), and errors in a config should appear before any device work begins.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MESH_AXES = ("data", "pipeline", "fsdp", "expert", "tensor")


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the key and the fix."""


@dataclass(slots=True)
class MeshConfig:
    data: int = 1  # data-parallel replicas; -1 fills with the devices left over
    fsdp: int = 1  # parameters and optimizer state sharded over this axis (ZeRO-3 style)
    expert: int = 1  # expert parallelism for MoE layers; dense layers treat it as data parallel
    tensor: int = 1  # Megatron-style tensor parallelism (heads and MLP columns split)
    pipeline: int = 1  # pipeline stages; 1 = no pipeline
    topology: str = "auto"  # preset in meshes/topologies (cpu_host, h100_host, ...), a YAML path, or auto
    cpu_devices: int = 0  # >0: run on this many simulated CPU devices (laptops, CI); 0 = real devices


@dataclass(slots=True)
class RopeScalingConfig:
    """Rotary scaling for long context (HF `rope_scaling`); only YaRN is implemented."""

    type: Literal["none", "yarn"] = "none"  # "yarn": YaRN frequency interpolation + attention-scale correction
    factor: float = 1.0  # context extension factor over original_max_position_embeddings
    original_max_position_embeddings: int = 4096  # context length of pretraining
    beta_fast: float = 32.0  # YaRN ramp: dims rotating more often than this are kept (extrapolated)
    beta_slow: float = 1.0  # YaRN ramp: dims rotating less often than this are fully interpolated
    mscale: float = 1.0  # cos/sin magnitude (0.1·mscale·ln(factor)+1, divided by the same with mscale_all_dim)
    mscale_all_dim: float = 0.0  # softmax scale × (0.1·mscale_all_dim·ln(factor)+1)²; 0 = no correction
    truncate: bool = True  # round the YaRN correction range to whole dims


@dataclass(slots=True)
class DeepSeekConfig:
    """DeepSeek-V3 fields (HF `config.json` names where they exist); used when model.kind=deepseek.

    Shared sizes come from `model.*`: d_model = hidden_size, n_layers = num_hidden_layers, n_heads =
    num_attention_heads, d_ff = intermediate_size (dense layers), norm_eps = rms_norm_eps, rope_theta,
    tie_embeddings = tie_word_embeddings, vocab_size.
    """

    q_lora_rank: int | None = None  # query compression rank; None = full-rank query projection
    kv_lora_rank: int = 64  # key/value latent width (what inference caches)
    qk_nope_head_dim: int = 32  # per-head query/key width without rotary positions
    qk_rope_head_dim: int = 16  # per-head query/key width with rotary positions (one key part shared by all heads)
    v_head_dim: int = 32  # per-head value width
    rope_interleave: bool = True  # rotary dims as interleaved pairs (DeepSeek checkpoints) or as two halves
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # YaRN long-context scaling
    n_routed_experts: int = 8  # fine-grained routed experts per MoE layer
    n_shared_experts: int = 1  # always-on experts per MoE layer (run as one MLP of n × moe_intermediate_size)
    num_experts_per_tok: int = 2  # routed experts chosen per token (K)
    moe_intermediate_size: int = 128  # hidden width of one expert
    first_k_dense_replace: int = 1  # the first k layers use a dense MLP of width model.d_ff instead of MoE
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"  # expert affinity from router logits
    # noaux_tc: selection by score + bias (aux-loss-free balancing), groups ranked by their top-2 sum (V3);
    # group_limited_greedy: groups ranked by their best score (V2); greedy: plain top-k
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    n_group: int = 1  # expert groups for group-limited routing (1 = off)
    topk_group: int = 1  # groups a token may route to
    # Score given to experts of unselected groups before the top-k: -inf (DeepSeek's published code and
    # transformers) or 0 (the first released HF remote code; differs when biased scores are negative)
    group_mask_fill: Literal["neg_inf", "zero"] = "neg_inf"
    norm_topk_prob: bool = True  # renormalise the K chosen weights to sum to 1
    routed_scaling_factor: float = 1.0  # routed-expert output multiplier
    bias_update_speed: float = 0.001  # gamma: per-step change of the selection bias from observed load
    aux_loss_alpha: float = 0.0  # alpha of the sequence-wise balance loss (per MoE layer, summed); 0 = off
    num_nextn_predict_layers: int = 0  # MTP depth D (extra future tokens predicted in training)
    mtp_loss_weight: float = 0.3  # lambda: MTP loss weight (the D depth losses are averaged)
    mtp_hidden_states_first: bool = False  # MTP projection input order [h; e] instead of the checkpoints' [e; h]


@dataclass(slots=True)
class ModelConfig:
    kind: Literal["dense", "deepseek"] = "dense"  # dense transformer v0, or DeepSeek-V3 (MLA + MoE + MTP)
    vocab_size: int = 256  # byte-level tokenizer by default
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    head_dim: int = 64  # width of one head
    d_ff: int = 1024  # hidden width of the GELU MLP
    rope_theta: float = 10000.0  # rotary position base
    tie_embeddings: bool = True  # output head reuses the input embedding
    norm_eps: float = 1e-5  # LayerNorm epsilon
    init_std: float = 0.02  # std of the normal initialiser (output projections scaled by 1/sqrt(2L))
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute dtype of activations and matmuls
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage dtype of parameters
    remat: Literal["none", "full", "save_matmuls"] = "none"  # activation rematerialisation per block
    # The stacked blocks run as one compiled loop body (true), or laid out straight, one copy per layer (false):
    # compiles take longer; on a GPU the step is faster and its temporaries smaller (no per-layer copies into and
    # out of the loop's stacked buffers; experiments/benchmarks/RESULTS.md)
    scan_layers: bool = True
    # jax.nn.dot_product_attention implementation; auto: cuDNN where it can run, else XLA (model/attention.py)
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # Layer types whose tensor-parallel matmuls overlap their all-gather / reduce-scatter with the matmul
    # (ring of ppermutes); the residual stream is then split over the sequence (rules.act_seq_parallel)
    collective_matmul: list[Literal["attention", "mlp"]] = field(default_factory=list)
    deepseek: DeepSeekConfig = field(default_factory=DeepSeekConfig)  # MLA/MoE/MTP fields (kind=deepseek)


@dataclass(slots=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" (Python's own sources), a text file, or a .npy token file
    max_bytes: int | None = None  # cap the corpus size (quick runs); None = everything
    seq_len: int = 256  # tokens per training sequence
    global_batch_size: int = 32  # sequences per optimizer step, across all devices
    eval_fraction: float = 0.02  # share of the corpus held out for evaluation
    seed: int = 0  # shuffling seed of the data order


@dataclass(slots=True)
class TopkConfig:
    """Options of optim.compression=topk | topk_hierarchical (jaxdeep/optim/README.md)."""

    ratio: float = 0.05  # fraction of its gradient entries each replica sends per step, in (0, 1]
    error_feedback: bool = True  # keep what was not sent and add it to the next step's gradient
    # how: "residual" (summed and added to the next gradient) or "ef21" (top-k of the change against an
    # estimate every replica knows; no momentum correction); jaxdeep/optim/README.md compares them
    feedback: Literal["residual", "ef21"] = "residual"
    selection: Literal["per_tensor", "global"] = "per_tensor"  # top-k within each tensor, or over all at once
    method: Literal["exact", "sampled"] = "exact"  # lax.top_k, or a magnitude threshold estimated from a sample
    sample_size: int = 16384  # entries sampled per tensor to estimate the threshold (method=sampled)
    min_size: int = 1024  # tensors with fewer entries per device are reduced densely
    warmup_steps: int = 0  # sparsity warm-up: density falls from warmup_start_ratio to ratio; 0 = off
    warmup_start_ratio: float = 0.25  # density during the first warm-up stage, in [ratio, 1] (used if warmup_steps > 0)
    warmup_stages: int = 4  # distinct densities in the warm-up (each compiles its own exchange)
    momentum: float = 0.0  # DGC momentum correction (velocity accumulated before selection), in [0, 1); 0 = off
    local_clip_norm: float = 0.0  # DGC local clipping: each replica clips to this × sqrt(replicas); 0 = off
    # "rms": each replica clips its gradient (optim.clip_norm) and divides it by its own RMS (Adam's second moment,
    # optim.b2 and optim.eps) before selecting, and the optimizer after the exchange is momentum alone
    # (jaxdeep/optim/README.md, "Preconditioning before the exchange")
    precondition: Literal["none", "rms"] = "none"


@dataclass(slots=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate of AdamW
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak (cosine decay)
    warmup_steps: int = 100  # linear warm-up steps from 0 to the peak
    weight_decay: float = 0.1  # decoupled weight decay (not applied to norms)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 = off
    grad_accum_steps: int = 1  # microbatches per optimizer step (global batch split evenly)
    freeze_variance_after: int = 0  # Adam's second moment and its bias correction stop after N updates; 0 = never
    # Gradient compression before the cross-replica reduction: none (dense), topk (top-k exchange among all
    # replicas) or topk_hierarchical (dense inside the fast tier of mesh.topology, top-k across the slow tier)
    compression: Literal["none", "topk", "topk_hierarchical"] = "none"
    topk: TopkConfig = field(default_factory=TopkConfig)  # options of the top-k compression modes


@dataclass(slots=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps in the run
    seed: int = 0  # parameter initialisation seed
    log_every: int = 10  # write a metrics line every N steps
    eval_every: int = 100  # evaluate on held-out data every N steps; 0 = only at the end
    eval_batches: int = 4  # held-out batches per evaluation
    checkpoint_every: int = 500  # save every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 3  # most recent checkpoints kept on disk
    async_checkpoint: bool = True  # write checkpoints in the background while training continues
    progress: bool = True  # show a progress bar
    peak_tflops: float = 0.0  # device peak for MFU; 0 = look it up from the device kind


@dataclass(slots=True)
class KernelsConfig:
    # LayerNorm: "fused" Triton kernel (GPU only; an error elsewhere), "auto" (fused where it can run), or pure JAX
    norm: Literal["reference", "fused", "auto"] = "reference"
    # MoE grouped matmul (kernels.gmm): "reference" (jax.lax.ragged_dot), "triton" (Triton kernels, GPU),
    # "interpret" (the Triton kernels in Triton's interpreter, CPU tests) or "auto" (fastest available here)
    gmm: Literal["reference", "auto", "triton", "interpret"] = "auto"
    # FP8 GEMMs of precision.matmul=fp8 (kernels.fp8): "reference" (pure JAX), "triton" (Triton kernels, GPU),
    # "mosaic" (Triton quantisers, GEMMs on the Pallas Mosaic GPU kernel; Hopper), "interpret" (the Triton kernels
    # in Triton's interpreter, CPU tests) or "auto" (mosaic on Hopper, else Triton where it can run)
    fp8: Literal["reference", "auto", "triton", "interpret", "mosaic"] = "auto"
    # Serving's decode kernels (kernels.decode, `kernels/decode`: a layer's attention over the cache, dense or
    # DeepSeek's latent): "pallas" (Pallas kernels on the Triton backend,
    # CUDA GPU; an error elsewhere), "xla" (the model's own jnp code), "interpret" (the Pallas kernels run on the
    # host, CPU tests) or "auto" (pallas where it can run, else xla)
    decode: Literal["auto", "pallas", "xla", "interpret"] = "auto"


@dataclass(slots=True)
class PrecisionConfig:
    # Linear layers and routed-expert matmuls: "bf16" runs them in model.dtype (bfloat16 by default, float32
    # where a test asks for it); "fp8" runs them with DeepSeek-V3's FP8 recipe (kernels/fp8: E4M3 operands
    # in 1 x 128 / 128 x 128 scaled tiles, float32 accumulation, forward and backward). The embedding, output
    # head, norms, router and attention scores stay in model.dtype / float32 either way.
    matmul: Literal["bf16", "fp8"] = "bf16"
    # With "fp8", the FP8 input of each MLP's down projection (dense, shared and routed experts) for its weight
    # gradient: "recompute" keeps only the activation's cached FP8 input and recomputes its output in the
    # backward (DeepSeek-V3; one byte less per hidden unit and token kept); "keep" keeps the output's FP8 copy too
    fp8_down_input: Literal["recompute", "keep"] = "recompute"


@dataclass(slots=True)
class ParallelConfig:
    # Pipeline (mesh.pipeline > 1): microbatch order; circular and interleaved run several virtual stages per
    # device (see jaxdeep/parallel/README.md)
    schedule: Literal["gpipe", "1f1b", "circular", "interleaved"] = "1f1b"
    microbatches: int = 0  # microbatches per step through the pipeline; 0 = 2 × mesh.pipeline
    virtual_stages: int = 1  # stages per device: 1 for gpipe and 1f1b, >= 2 for circular and interleaved
    stage_layers: list[int] = field(default_factory=list)  # layers per stage in order; [] = balanced by cost
    # Skip stage-specific work (embedding, head and loss, padding layers) on stages that do not need it, by
    # branches that only some devices take; off: every stage computes it and keeps what it needs (always so on
    # CPU, whose runtime hangs on such branches around collectives). Worth it when the head is costly.
    stage_branches: bool = False
    # Data-parallel gradient reduction: "hierarchical" reduce-scatters inside the fast tier, all-reduces across
    # the slow one and all-gathers back; "auto" does so when mesh.data spans several topology tiers
    grad_reduce: Literal["flat", "hierarchical", "auto"] = "flat"


def default_rules() -> dict[str, list[str]]:
    # Logical axis name -> mesh axes it is split over. Parameters use `embed`, `heads`, ...;
    # activations use the `act_*` names so that a parameter's fsdp split never leaks into them.
    return {
        "batch": ["data", "fsdp", "expert"],
        "vocab": ["tensor"],
        "embed": ["fsdp"],
        "heads": ["tensor"],
        "head_dim": [],
        "mlp": ["tensor"],
        "norm": [],
        "layers": ["pipeline"],  # stacked blocks: each pipeline stage stores the layers it runs
        "act_seq": [],
        "act_embed": [],
        "act_heads": ["tensor"],
        "act_mlp": ["tensor"],
        "act_vocab": ["tensor"],
        "act_seq_parallel": ["tensor"],  # residual-stream sequence split when model.collective_matmul is on
        "expert": ["expert"],  # routed experts of a MoE layer (expert parallelism)
        "router": [],  # the router's expert dim: every device scores all experts
        "q_lora": [],  # MLA query latent
        "kv_lora": [],  # MLA key/value latent
    }


@dataclass(slots=True)
class ShardingConfig:
    rules: dict[str, list[str]] = field(default_factory=default_rules)  # logical name -> mesh axes


@dataclass(slots=True)
class ExperimentConfig:
    name: str = "experiment"  # run name, used for the default run directory
    mesh: MeshConfig = field(default_factory=MeshConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# ----------------------------------------------------------------------------- typed parsing


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]  # `rules.embed=fsdp` is shorthand for [fsdp]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; allowed keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, {} if data[name] is None else data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; configs mean a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` with the value read as YAML (so 3, 1e-4, true, [data, fsdp] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults) and apply `section.key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; pass a YAML file such as experiments/quickstart.yaml"
            )
        try:
            data = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    base = to_dict(ExperimentConfig())
    # Rules are replaced key by key, so a YAML file lists only the rules it changes.
    merged = _merge(base, data)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(merged, key, value)
    cfg = _build(ExperimentConfig, merged, "")
    validate(cfg)
    return cfg


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _positive(cfg: Any, section: str, names: list[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name}: must be positive, got {value}")


def validate(cfg: ExperimentConfig) -> None:
    """Checks that need no devices. Mesh sizes against the device count are checked by the mesh builder."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _positive(m, "model", ["vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "norm_eps"])
    _positive(d, "data", ["seq_len", "global_batch_size", "max_bytes"])
    _positive(o, "optim", ["lr", "grad_accum_steps"])
    _positive(t, "train", ["steps", "log_every", "eval_batches", "keep_checkpoints"])
    if not 0.0 < d.eval_fraction < 0.5:
        raise ConfigError(f"data.eval_fraction: must be in (0, 0.5), got {d.eval_fraction}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0 or o.clip_norm < 0 or o.weight_decay < 0:
        raise ConfigError("optim.warmup_steps, optim.clip_norm and optim.weight_decay must be >= 0")
    if o.freeze_variance_after < 0:
        raise ConfigError(f"optim.freeze_variance_after: must be >= 0 (0 = never), got {o.freeze_variance_after}")
    if o.freeze_variance_after > 0 and o.compression != "none" and o.topk.precondition == "rms":
        raise ConfigError(
            "optim.freeze_variance_after does not combine with optim.topk.precondition=rms: the second moment is "
            "then each replica's, before the exchange; set one of them off"
        )
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim: rotary embeddings need an even head_dim, got {m.head_dim}")
    validate_topk(o.topk)
    if m.kind == "deepseek":
        validate_deepseek(m)
        if cfg.precision.matmul == "fp8" and o.compression != "none":
            raise ConfigError(
                f"precision.matmul=fp8 does not combine with optim.compression={o.compression} for model.kind="
                f"deepseek yet (the per-replica gradients of the FP8 expert matmuls); use optim.compression=none "
                f"or precision.matmul=bf16"
            )
    if d.global_batch_size % o.grad_accum_steps:
        raise ConfigError(
            f"optim.grad_accum_steps={o.grad_accum_steps} must divide data.global_batch_size={d.global_batch_size}"
        )
    if t.eval_every < 0 or t.checkpoint_every < 0:
        raise ConfigError("train.eval_every and train.checkpoint_every must be >= 0 (0 = only at the end)")
    mesh = cfg.mesh
    sizes = {a: getattr(mesh, a) for a in MESH_AXES}
    fills = [a for a, s in sizes.items() if s == -1]
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}: must be a positive integer or -1 (fill), got {size}")
    if len(fills) > 1:
        raise ConfigError(f"mesh: only one axis may be -1 (fill), got {', '.join('mesh.' + a for a in fills)}")
    if mesh.cpu_devices < 0:
        raise ConfigError(f"mesh.cpu_devices: must be >= 0, got {mesh.cpu_devices}")
    for logical, axes in cfg.sharding.rules.items():
        for axis in axes:
            if axis not in MESH_AXES:
                raise ConfigError(
                    f"sharding.rules.{logical}: unknown mesh axis {axis!r}; mesh axes are {', '.join(MESH_AXES)}"
                )
        if len(set(axes)) != len(axes):
            raise ConfigError(f"sharding.rules.{logical}: a mesh axis appears twice in {axes}")
    check_splits(cfg, sizes)


def validate_topk(tk: TopkConfig) -> None:
    """Ranges of the optim.topk.* fields (checked whatever optim.compression is, so a typo never waits)."""
    key = "optim.topk"
    if not 0.0 < tk.ratio <= 1.0:
        raise ConfigError(f"{key}.ratio: must be in (0, 1], got {tk.ratio}")
    if tk.warmup_steps > 0 and not tk.ratio <= tk.warmup_start_ratio <= 1.0:
        raise ConfigError(
            f"{key}.warmup_start_ratio: must be in [{key}.ratio={tk.ratio}, 1] with a warm-up, "
            f"got {tk.warmup_start_ratio}"
        )
    _positive(tk, key, ["sample_size", "warmup_stages"])
    for name in ("min_size", "warmup_steps", "local_clip_norm"):
        if getattr(tk, name) < 0:
            raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(tk, name)}")
    if not 0.0 <= tk.momentum < 1.0:
        raise ConfigError(f"{key}.momentum: must be in [0, 1), got {tk.momentum}")
    if tk.feedback == "ef21" and tk.momentum > 0:
        raise ConfigError(f"{key}.feedback=ef21 does not combine with {key}.momentum > 0; set one of them off")
    if tk.precondition == "rms" and tk.momentum > 0:
        raise ConfigError(
            f"{key}.precondition=rms does not combine with {key}.momentum > 0: the optimizer after the exchange "
            "already is momentum (optim.b1); set one of them off"
        )


def validate_deepseek(m: ModelConfig) -> None:
    """Consistency of the model.deepseek.* fields (see DeepSeekConfig)."""
    ds, key = m.deepseek, "model.deepseek"
    _positive(ds, key, ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"])
    _positive(ds, key, ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"])
    for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        if getattr(ds, name) < 0:
            raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(ds, name)}")
    for name in ("bias_update_speed", "aux_loss_alpha", "mtp_loss_weight", "routed_scaling_factor"):
        if getattr(ds, name) < 0:
            raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(ds, name)}")
    if ds.qk_rope_head_dim % 2:
        raise ConfigError(f"{key}.qk_rope_head_dim: rotary embeddings need an even width, got {ds.qk_rope_head_dim}")
    if ds.first_k_dense_replace > m.n_layers:
        raise ConfigError(f"{key}.first_k_dense_replace={ds.first_k_dense_replace} exceeds model.n_layers={m.n_layers}")
    if ds.num_experts_per_tok > ds.n_routed_experts:
        raise ConfigError(
            f"{key}.num_experts_per_tok={ds.num_experts_per_tok} exceeds n_routed_experts={ds.n_routed_experts}"
        )
    if ds.n_routed_experts % ds.n_group:
        raise ConfigError(f"{key}.n_group={ds.n_group} must divide n_routed_experts={ds.n_routed_experts}")
    if ds.topk_group > ds.n_group:
        raise ConfigError(f"{key}.topk_group={ds.topk_group} exceeds n_group={ds.n_group}")
    group_size = ds.n_routed_experts // ds.n_group
    if ds.n_group > 1 and ds.topk_method != "greedy":
        if ds.num_experts_per_tok > ds.topk_group * group_size:
            raise ConfigError(
                f"{key}.num_experts_per_tok={ds.num_experts_per_tok} is more than the topk_group={ds.topk_group} "
                f"selected groups of {group_size} experts hold; raise topk_group"
            )
        if ds.topk_method == "noaux_tc" and group_size < 2:
            raise ConfigError(f"{key}.n_group: noaux_tc ranks groups by their top-2 experts; groups need >= 2 experts")
    rs = ds.rope_scaling
    if rs.type == "yarn":
        if rs.factor < 1.0:
            raise ConfigError(f"{key}.rope_scaling.factor: must be >= 1 for yarn, got {rs.factor}")
        _positive(rs, f"{key}.rope_scaling", ["original_max_position_embeddings", "beta_fast", "beta_slow"])


def check_splits(cfg: ExperimentConfig, sizes: dict[str, int]) -> None:
    """Every dimension split over mesh axes must divide evenly (axes of size -1 are not known yet)."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    splits = {
        "model.n_heads": (m.n_heads, "heads"),
        "model.d_ff": (m.d_ff, "mlp"),
        "model.vocab_size": (m.vocab_size, "vocab"),
        "model.d_model": (m.d_model, "embed"),
        "model.n_layers": (m.n_layers, "layers"),
        "model.head_dim": (m.head_dim, "head_dim"),
        "data.seq_len": (d.seq_len, "act_seq"),
        "data.global_batch_size // optim.grad_accum_steps": (
            d.global_batch_size // o.grad_accum_steps,
            "batch",
        ),
    }
    if m.kind == "deepseek":
        ds = m.deepseek
        splits["model.deepseek.n_routed_experts"] = (ds.n_routed_experts, "expert")
        splits["model.deepseek.moe_intermediate_size"] = (ds.moe_intermediate_size, "mlp")
        splits["model.deepseek.moe_intermediate_size × n_shared_experts"] = (
            ds.moe_intermediate_size * max(ds.n_shared_experts, 1),
            "mlp",
        )
    for key, (dim, logical) in splits.items():
        axes = cfg.sharding.rules.get(logical, [])
        if any(sizes[a] == -1 for a in axes):
            continue
        shards = 1
        for a in axes:
            shards *= sizes[a]
        if dim % shards:
            names = " × ".join(f"mesh.{a}={sizes[a]}" for a in axes)
            raise ConfigError(
                f"{key}={dim} is split over {names} = {shards} shards (sharding.rules.{logical}) and must divide "
                f"evenly; change the size or the mesh"
            )
    check_parallel(cfg, sizes)


def pipeline_microbatches(cfg: ExperimentConfig, pipeline: int) -> int:
    """Microbatches per step through a pipeline of `pipeline` devices (parallel.microbatches, 0 = 2 × stages)."""
    return cfg.parallel.microbatches or 2 * pipeline


def check_parallel(cfg: ExperimentConfig, sizes: dict[str, int]) -> None:
    """The parallel.* fields against the model and the mesh (mesh sizes of -1 are not known yet)."""
    par, m, key = cfg.parallel, cfg.model, "parallel"
    if par.microbatches < 0:
        raise ConfigError(f"{key}.microbatches: must be >= 0 (0 = 2 × mesh.pipeline), got {par.microbatches}")
    multi = par.schedule in ("circular", "interleaved")
    if multi and par.virtual_stages < 2:
        raise ConfigError(
            f"{key}.virtual_stages={par.virtual_stages}: schedule {par.schedule} runs several stages per device; "
            f"set it to 2 or more (or use schedule gpipe / 1f1b)"
        )
    if not multi and par.virtual_stages != 1:
        raise ConfigError(
            f"{key}.virtual_stages={par.virtual_stages}: schedule {par.schedule} runs one stage per device; set it "
            f"to 1, or use schedule circular / interleaved for several"
        )
    if par.grad_reduce == "hierarchical" and (sizes["pipeline"] not in (1, -1) or cfg.optim.compression != "none"):
        raise ConfigError(
            f"{key}.grad_reduce=hierarchical does not combine with mesh.pipeline > 1 or optim.compression yet "
            f"(optim.compression=topk_hierarchical has its own); use flat or auto"
        )
    if m.collective_matmul and sizes["tensor"] != -1:
        tp = sizes["tensor"]
        if cfg.data.seq_len % tp:
            raise ConfigError(
                f"data.seq_len={cfg.data.seq_len} must divide by mesh.tensor={tp}: model.collective_matmul splits "
                f"the sequence over the tensor axis"
            )
    p = sizes["pipeline"]
    if p == 1 or p == -1:
        return
    if m.kind != "dense":
        raise ConfigError(
            f"mesh.pipeline={p}: pipeline parallelism runs model.kind=dense only so far; set mesh.pipeline=1"
        )
    if cfg.optim.compression != "none":
        raise ConfigError(
            f"mesh.pipeline={p}: optim.compression={cfg.optim.compression} does not combine with the pipeline yet; "
            f"set optim.compression=none or mesh.pipeline=1"
        )
    n_stages = p * par.virtual_stages
    if par.stage_layers:
        if len(par.stage_layers) != n_stages or any(n < 1 for n in par.stage_layers):
            raise ConfigError(
                f"{key}.stage_layers={par.stage_layers}: give {n_stages} positive layer counts (mesh.pipeline={p} × "
                f"parallel.virtual_stages={par.virtual_stages}), or [] to balance by cost"
            )
        if sum(par.stage_layers) != m.n_layers:
            raise ConfigError(
                f"{key}.stage_layers={par.stage_layers} sums to {sum(par.stage_layers)}, not model.n_layers="
                f"{m.n_layers}"
            )
    elif m.n_layers < n_stages:
        raise ConfigError(
            f"model.n_layers={m.n_layers} is fewer than the {n_stages} pipeline stages (mesh.pipeline={p} × "
            f"parallel.virtual_stages={par.virtual_stages}); every stage needs a layer"
        )
    micro = pipeline_microbatches(cfg, p)
    per_step = cfg.data.global_batch_size // cfg.optim.grad_accum_steps
    if per_step % micro:
        raise ConfigError(
            f"{key}.microbatches={micro} must divide data.global_batch_size // optim.grad_accum_steps={per_step}"
        )
    shards = 1
    for axis in cfg.sharding.rules.get("batch", []):
        shards *= max(sizes[axis], 1)
    if (per_step // micro) % shards:
        raise ConfigError(
            f"a pipeline microbatch holds {per_step // micro} sequences (data.global_batch_size // "
            f"optim.grad_accum_steps // {key}.microbatches), which must divide by the {shards} batch shards "
            f"(sharding.rules.batch); lower {key}.microbatches or raise data.global_batch_size"
        )
