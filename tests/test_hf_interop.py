"""Hugging Face interop: exact round trips, files transformers reads, sharded placement, refusals."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors import safe_open
from transformers import DeepseekV3ForCausalLM

import jaxdeep.hf as hf
import jaxdeep.hf.convert as convert
from jaxdeep import cli
from jaxdeep.config import ConfigError, default_rules, load_config
from jaxdeep.hf.config_map import model_config_from_hf
from jaxdeep.hf.model import ModelStructure, single_device_mesh
from tests.helpers import layout
from tests.test_deepseek_reference import CASES, hf_v3_model, reference_logits, tokens

TOLERANCE = 1e-4


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_equal(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        assert la[key].dtype == lb[key].dtype, key
        np.testing.assert_array_equal(la[key], lb[key], err_msg=key)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """A transformers checkpoint with an MTP layer (written by our saver from transformers' weights)."""
    reference = hf_v3_model()
    directory = tmp_path_factory.mktemp("reference")
    reference.save_pretrained(directory)
    return reference, directory


def test_load_save_load_is_exact_and_transformers_reads_the_saved_files(reference_dir, tmp_path):
    reference, directory = reference_dir
    model, cfg = hf.load(directory)
    hf.save(model, tmp_path / "once", max_shard_bytes=20_000)  # small shards: exercises the index
    assert (tmp_path / "once" / "model.safetensors.index.json").is_file()
    again, cfg_again = hf.load(tmp_path / "once")
    assert cfg_again == cfg
    _assert_trees_equal(again.params, model.params)
    _assert_trees_equal(again.model_state, model.model_state)
    hf.save(again, tmp_path / "twice")  # one file this time: the same tensors whatever the sharding
    assert (tmp_path / "twice" / "model.safetensors").is_file()
    _assert_trees_equal(hf.load(tmp_path / "twice")[0].params, model.params)

    ids = tokens()
    ours = np.asarray(again(ids))
    reread = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "once").eval()
    assert float(np.abs(reference_logits(reread, ids) - ours).max()) <= TOLERANCE
    assert float(np.abs(reference_logits(reference, ids) - ours).max()) <= TOLERANCE


def test_mtp_layers_round_trip_in_deepseek_layout(reference_dir, tmp_path):
    # transformers writes no MTP weights: start from our own randomly initialised model with one MTP layer.
    _, directory = reference_dir
    config = json.loads((directory / "config.json").read_text())
    cfg = model_config_from_hf({**config, "num_nextn_predict_layers": 1})
    shapes = ModelStructure(cfg, single_device_mesh(), default_rules()).shapes()
    rng = np.random.default_rng(3)
    params, state = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    model = hf.HFModel(cfg, params, state)
    hf.save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        keys = set(f.keys())
    # DeepSeek's layout: MTP module k is decoder layer num_hidden_layers + k, with copies of embedding and head.
    layer = cfg.n_layers
    expected = ["eh_proj", "enorm", "hnorm", "shared_head.norm", "embed_tokens", "shared_head.head"]
    expected = [f"{name}.weight" for name in expected] + ["mlp.experts.7.down_proj.weight"]
    for name in [*expected, "mlp.gate.e_score_correction_bias"]:
        assert f"model.layers.{layer}.{name}" in keys, name
    back, _ = hf.load(tmp_path)
    _assert_trees_equal(back.params, model.params)
    _assert_trees_equal(back.model_state, model.model_state)


def test_load_can_leave_the_mtp_modules_unread(reference_dir, tmp_path, monkeypatch):
    # Serving never runs the MTP modules: `skip` reads none of their tensors, and the model without them gives the
    # same logits as with them.
    _, directory = reference_dir
    config = json.loads((directory / "config.json").read_text())
    cfg = model_config_from_hf({**config, "num_nextn_predict_layers": 1})
    shapes = ModelStructure(cfg, single_device_mesh(), default_rules()).shapes()
    rng = np.random.default_rng(4)
    params, state = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.05, shapes)
    hf.save(hf.HFModel(cfg, params, state), tmp_path)
    full, _ = hf.load(tmp_path)
    read = []
    read_block = convert._read_block
    monkeypatch.setattr(convert, "_read_block", lambda leaf, *a: read.append(leaf.path) or read_block(leaf, *a))
    lean, _ = hf.load(tmp_path, skip=["mtp"])
    assert read and not [path for path in read if path[0] == "mtp"]
    assert "mtp" not in lean.params and "mtp" not in lean.model_state and "mtp" in full.params
    _assert_trees_equal(lean.params, {k: v for k, v in full.params.items() if k != "mtp"})
    _assert_trees_equal(lean.model_state, {k: v for k, v in full.model_state.items() if k != "mtp"})
    ids = tokens(shape=(2, 9))
    np.testing.assert_array_equal(np.asarray(lean(ids)), np.asarray(full(ids)))
    with pytest.raises(ValueError, match="no parameter group"):
        hf.load(tmp_path, skip=["mpt"])


def test_bfloat16_files(reference_dir, tmp_path):
    _, directory = reference_dir
    model, _ = hf.load(directory)
    hf.save(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    half, cfg = hf.load(tmp_path)
    assert cfg.param_dtype == "bfloat16"
    want = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), model.params)
    _assert_trees_equal(half.params, want)
    _assert_trees_equal(half.model_state, model.model_state)  # the selection bias stays float32


def test_load_places_each_device_block_straight_into_its_sharding(reference_dir, monkeypatch):
    _, directory = reference_dir
    _, mesh = layout("model.kind=deepseek", expert=4, tensor=2)
    blocks = []
    read_block = convert._read_block

    def spy(leaf, reader, index):
        blocks.append((leaf.path, index))
        return read_block(leaf, reader, index)

    monkeypatch.setattr(convert, "_read_block", spy)
    model, _ = hf.load(directory, mesh=mesh)
    want = model.structure.param_shardings
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        assert leaf.sharding == _at(want, path), jax.tree_util.keystr(path)
    gate_up = model.params["moe_blocks"]["mlp"]["experts"]["gate_up_proj"]
    assert gate_up.sharding.spec[1] == "expert" and gate_up.addressable_shards[0].data.shape[1] == 2
    # Each distinct block (4 expert groups × 2 halves of the hidden units) is read once, on its own.
    expert_blocks = [index for path, index in blocks if path[-1] == "gate_up_proj"]
    assert len(expert_blocks) == 8
    assert all(len(range(*index[1].indices(8))) == 2 for index in expert_blocks)
    ids = tokens(shape=(8, 12))
    single, _ = hf.load(directory)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(single(ids)), atol=1e-5)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attention_bias", True),
        ("hidden_act", "gelu"),
        ("quantization_config", {"quant_method": "fp8"}),
        ("sliding_window", 128),
        ("attention_dropout", 0.1),
    ],  # fmt: skip
)
def test_unsupported_config_fields_fail_naming_the_field(reference_dir, tmp_path, field, value):
    _, directory = reference_dir
    config = json.loads((directory / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(ConfigError, match=field):
        hf.load(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_routed_experts", 16, r"lacks tensor 'model\.layers\.\d+\.mlp\.experts\.\d+\."),  # files hold 8
        ("moe_intermediate_size", 8, r"tensor 'model\.layers\.\d+\.mlp\.experts\.\d+\.\w+\.weight' has shape"),
        ("first_k_dense_replace", 2, r"lacks tensor 'model\.layers\.1\.mlp\.down_proj"),
    ],
)
def test_tensors_that_disagree_with_config_fail_naming_the_tensor(reference_dir, tmp_path, field, value, message):
    _, directory = reference_dir
    config = json.loads((directory / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(ConfigError, match=message):
        hf.load(tmp_path)


def test_cli_converts_to_a_run_and_back_exactly(reference_dir, tmp_path):
    _, directory = reference_dir
    run = tmp_path / "run"
    # The tiny checkpoint's vocabulary has 64 ids: the run reads a token file of such ids.
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 64, 50_000).astype(np.int32))
    common = ["mesh.data=2", "mesh.expert=4", f"data.source={tmp_path / 'tokens.npy'}", "data.seq_len=16"]
    common += ["data.global_batch_size=8"]
    assert cli.main(["convert", "from-hf", str(directory), str(run), *common]) == 0
    cfg = load_config(run / "config.yaml")
    assert cfg.model.kind == "deepseek" and cfg.mesh.expert == 4 and cfg.model.deepseek.n_group == 2
    assert cli.main(["convert", "to-hf", str(run), str(tmp_path / "back"), "--step", "0"]) == 0
    original, _ = hf.load(directory)
    back, _ = hf.load(tmp_path / "back")
    _assert_trees_equal(back.params, original.params)
    _assert_trees_equal(back.model_state, original.model_state)
    # A second import into the same run would overwrite its checkpoint: refused.
    assert cli.main(["convert", "from-hf", str(directory), str(run), *common]) == 2


def test_yarn_and_tied_embeddings_read_back_in_transformers(tmp_path):
    reference = hf_v3_model(**CASES["groups_2_of_4_two_dense_yarn_tied"])
    reference.save_pretrained(tmp_path / "reference")
    model, _ = hf.load(tmp_path / "reference")
    hf.save(model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["rope_scaling"]["type"] == "yarn" and written["tie_word_embeddings"] is True
    reread = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = tokens()
    assert float(np.abs(reference_logits(reread, ids) - np.asarray(model(ids))).max()) <= TOLERANCE
