"""Experiment configs: YAML files, `section.key=value` overrides, round trips, and errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest

import meshes
from jaxdeep.config import ConfigError, ExperimentConfig, default_rules, load_config, save_config
from jaxdeep.train.loop import mesh_from_config

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))

YAML = """\
name: yaml_test
mesh:
  data: 2
  tensor: 2
model:
  d_model: 64
  remat: full
sharding:
  rules:
    embed: [fsdp, tensor]
"""


def _write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- loading and overrides


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(
        _write(tmp_path, YAML),
        [
            "train.steps=7",
            "optim.lr=1",
            "model.tie_embeddings=false",
            "sharding.rules.mlp=[fsdp, tensor]",
            "sharding.rules.extra=fsdp",
            "data.max_bytes=null",
            "model.d_model=128",
        ],
    )
    defaults = ExperimentConfig()
    assert cfg.name == "yaml_test"
    assert (cfg.mesh.data, cfg.mesh.tensor, cfg.mesh.fsdp) == (2, 2, 1)
    assert cfg.model.remat == "full"
    assert cfg.model.d_model == 128  # an override beats the file
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float  # an int is widened for a float field
    assert cfg.model.tie_embeddings is False
    assert cfg.data.max_bytes is None
    # Rules are merged key by key: the file and overrides change only the rules they name.
    rules = default_rules()
    assert cfg.sharding.rules == {**rules, "embed": ["fsdp", "tensor"], "mlp": ["fsdp", "tensor"], "extra": ["fsdp"]}
    # Everything not mentioned keeps its default.
    assert cfg.data == type(defaults.data)(max_bytes=None)
    assert cfg.kernels == defaults.kernels
    assert cfg.optim == type(defaults.optim)(lr=1.0)


def test_defaults_without_a_file():
    cfg = load_config(None, ["data.max_bytes=1000", "model.dtype=float32"])
    assert cfg.data.max_bytes == 1000 and cfg.model.dtype == "float32"
    assert cfg.model.n_layers == ExperimentConfig().model.n_layers
    assert load_config() == ExperimentConfig()


def test_override_values_keep_everything_after_the_first_equals_sign():
    cfg = load_config(None, ["name=a=b", " train.steps = 5"])
    assert cfg.name == "a=b" and cfg.train.steps == 5


def test_topk_feedback_reaches_the_transform_options():
    from jaxdeep.optim.build import topk_options

    cfg = load_config(None, ["optim.compression=topk", "optim.topk.feedback=ef21"])
    assert topk_options(cfg.optim).feedback == "ef21"
    assert topk_options(load_config(None, []).optim).feedback == "residual"


def test_scientific_notation_float_override():
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == pytest.approx(1e-4)


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(
        _write(tmp_path, YAML),
        ["optim.lr=1.5e-3", "model.norm_eps=1.0e-6", "data.max_bytes=12345", "sharding.rules.extra=[data]"],
    )
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert again.sharding.rules["extra"] == ["data"] and again.optim.lr == 1.5e-3


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_files_load(path):
    cfg = load_config(path)
    assert cfg != ExperimentConfig()  # the file's settings took effect
    if cfg.mesh.cpu_devices == 8:  # made for the simulated devices the tests run on: the mesh must build
        mesh, _ = mesh_from_config(cfg)
        assert mesh.devices.size == 8


def test_there_are_experiment_files():
    # Guards the parametrisation above against a glob that finds nothing.
    assert "quickstart" in {p.stem for p in EXPERIMENTS}


def test_config_module_does_not_import_jax():
    code = "import sys, jaxdeep.config; assert 'jax' not in sys.modules, 'jaxdeep.config imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- errors


BAD_OVERRIDES = {
    "unknown section": (["foo.bar=1"], ["unknown key foo", "allowed keys", "model", "sharding"]),
    "unknown key in a section": (["model.n_layer=2"], ["model.n_layer", "allowed keys in model", "n_layers"]),
    "string for int": (["train.steps=abc"], ["train.steps", "expected an integer", "'abc'"]),
    "float for int": (["model.n_layers=2.5"], ["model.n_layers", "expected an integer", "2.5"]),
    "whole float for int": (["model.n_layers=2.0"], ["model.n_layers", "expected an integer"]),
    "int for bool": (["model.tie_embeddings=1"], ["model.tie_embeddings", "expected true or false"]),
    "bool for int": (["train.steps=true"], ["train.steps", "expected an integer"]),
    "bool for float": (["optim.lr=true"], ["optim.lr", "expected a number"]),
    "string for optional int": (["data.max_bytes=lots"], ["data.max_bytes", "'lots'", "int"]),
    "int for string": (["name=5"], ["name", "expected a string"]),
    "scalar for a list": (["sharding.rules.embed=3"], ["sharding.rules.embed", "expected a list"]),
    "scalar for a section": (["model=3"], ["model", "expected a mapping"]),
    "key below a value": (["model.n_layers.x=3"], ["model.n_layers.x", "n_layers is not a section"]),
    "literal not allowed": (["model.remat=all"], ["model.remat", "'all'", "'none'", "'full'", "'save_matmuls'"]),
    "literal dtype": (["model.dtype=float16"], ["model.dtype", "'float32'", "'bfloat16'"]),
    "two fill axes": (["mesh.data=-1", "mesh.fsdp=-1"], ["mesh.data", "mesh.fsdp", "only one axis may be -1"]),
    "zero mesh axis": (["mesh.tensor=0"], ["mesh.tensor", "positive integer or -1", "got 0"]),
    "negative mesh axis": (["mesh.fsdp=-2"], ["mesh.fsdp", "positive integer or -1", "got -2"]),
    "unknown mesh axis in a rule": (
        ["sharding.rules.embed=[fsdp, model]"],
        ["sharding.rules.embed", "'model'", "data, pipeline, fsdp, expert, tensor"],
    ),
    "mesh axis twice in a rule": (["sharding.rules.mlp=[tensor, tensor]"], ["sharding.rules.mlp", "twice"]),
    "heads not divisible by tensor": (
        ["model.n_heads=4", "mesh.tensor=3"],
        ["model.n_heads=4", "mesh.tensor=3", "sharding.rules.heads", "divide evenly"],
    ),
    "batch not divisible by data x fsdp": (
        ["data.global_batch_size=12", "mesh.data=2", "mesh.fsdp=4"],
        ["data.global_batch_size", "=12", "mesh.data=2", "mesh.fsdp=4", "8 shards", "sharding.rules.batch"],
    ),
    "microbatch not divisible by data": (
        ["data.global_batch_size=16", "optim.grad_accum_steps=4", "mesh.data=8"],
        ["optim.grad_accum_steps", "=4", "mesh.data=8"],
    ),
    "odd head_dim": (["model.head_dim=7"], ["model.head_dim", "even"]),
    "non-positive size": (["model.n_layers=0"], ["model.n_layers", "must be positive"]),
    "override without =": (["train.steps"], ["'train.steps'", "expected section.key=value"]),
    "override with empty key": (["=3"], ["empty key"]),
    "override value not YAML": (["sharding.rules.embed=[fsdp"], ["sharding.rules.embed", "cannot parse"]),
    "unknown feedback": (["optim.topk.feedback=ef1"], ["optim.topk.feedback", "'residual'", "'ef21'"]),
    "ef21 with momentum": (
        ["optim.topk.feedback=ef21", "optim.topk.momentum=0.9"],
        ["optim.topk.feedback=ef21", "optim.topk.momentum"],
    ),
}


@pytest.mark.parametrize("overrides, expected", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_bad_override_names_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    missing = [text for text in expected if text not in str(err.value)]
    assert not missing, f"{missing} not in message: {err.value}"


BAD_FILES = {
    "unknown key in a file": ("model:\n  n_layer: 2\n", ["model.n_layer", "allowed keys in model"]),
    "unknown section in a file": ("modle:\n  n_layers: 2\n", ["unknown key modle", "model"]),
    "wrong type in a file": ("train:\n  steps: many\n", ["train.steps", "expected an integer"]),
    "invalid YAML": ("model: [d_model: 3\n", ["exp.yaml", "not valid YAML"]),
    "not a mapping": ("- a\n- b\n", ["exp.yaml", "expected a mapping"]),
    "section not a mapping": ("model: [1, 2]\n", ["model", "expected a mapping"]),
}


@pytest.mark.parametrize("text, expected", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_names_the_problem(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    missing = [t for t in expected if t not in str(err.value)]
    assert not missing, f"{missing} not in message: {err.value}"


@pytest.mark.parametrize("value", ["0", "false", "[]"])
def test_falsy_value_for_a_section_is_an_error(tmp_path, value):
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(_write(tmp_path, "model:\n  d_model: 64\n"), [f"model={value}"])


def test_layers_split_must_divide_n_layers():
    with pytest.raises(ConfigError, match=r"model\.n_layers"):
        cfg = load_config(None, ["model.n_layers=2", "sharding.rules.layers=[fsdp]", "mesh.fsdp=4", "mesh.data=2"])
        mesh_from_config(cfg)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist; pass a YAML file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a directory is not a config file


# ----------------------------------------------------------------------------- mesh against the devices


def test_impossible_mesh_for_the_device_count():
    cfg = load_config(None, ["mesh.data=3", "data.global_batch_size=24"])  # valid on its own
    with pytest.raises(meshes.MeshError) as err:
        mesh_from_config(cfg)
    assert "data=3" in str(err.value) and "8 available devices" in str(err.value)

    cfg = load_config(None, ["mesh.data=-1", "mesh.expert=3"])
    with pytest.raises(meshes.MeshError) as err:
        mesh_from_config(cfg)
    assert "expert=3" in str(err.value) and "8 available devices" in str(err.value) and "data=-1" in str(err.value)


def test_fill_axis_is_checked_once_resolved():
    # data=-1 is unknown while loading, so the batch split is checked when the mesh is built (data=8 here).
    cfg = load_config(None, ["mesh.data=-1", "data.global_batch_size=4"])
    with pytest.raises(ConfigError, match=r"data\.global_batch_size.*=4 .*mesh\.data=8"):
        mesh_from_config(cfg)
    mesh, _ = mesh_from_config(load_config(None, ["mesh.data=-1", "mesh.tensor=2"]))
    assert dict(mesh.shape) == {"data": 4, "pipeline": 1, "fsdp": 1, "expert": 1, "tensor": 2}
