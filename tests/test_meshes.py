"""meshes: axis sizes, device order, tiers crossed per axis, topology files and the mesh description."""

import dataclasses
import itertools
import math
import warnings
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshes import (
    AXES,
    MeshError,
    MeshLayoutWarning,
    Tier,
    Topology,
    TopologyError,
    axis_tier_split,
    axis_tiers,
    build_mesh,
    default_devices,
    describe_mesh,
    load_topology,
    preset_names,
    resolve_axis_sizes,
    topology_from_dict,
)


def fake_devices(n_processes: int, per_process: int, platform: str = "gpu") -> list[SimpleNamespace]:
    return [
        SimpleNamespace(id=p * 1000 + i, process_index=p, platform=platform, device_kind="NVIDIA H100 80GB HBM3")
        for p in range(n_processes)
        for i in range(per_process)
    ]


def tiers_of(*group_sizes: int) -> Topology:
    return Topology(
        name="test",
        tiers=tuple(Tier(f"t{i}", g, 100.0 / (i + 1), 1.0 + i) for i, g in enumerate(group_sizes)),
    )


# ---- axis sizes -------------------------------------------------------------------------------------------


def test_fill_takes_the_remaining_devices_and_missing_axes_are_one():
    assert resolve_axis_sizes({"data": -1, "tensor": 2}, 8) == {
        "data": 4,
        "pipeline": 1,
        "fsdp": 1,
        "expert": 1,
        "tensor": 2,
    }
    assert resolve_axis_sizes({"fsdp": -1}, 8)["fsdp"] == 8
    assert resolve_axis_sizes({"tensor": 2, "data": 2, "expert": 2}, 8) == dict(
        data=2, pipeline=1, fsdp=1, expert=2, tensor=2
    )
    assert list(resolve_axis_sizes({"tensor": 8}, 8)) == list(AXES)


@pytest.mark.parametrize(
    "sizes, n, expected",
    [
        ({"model": 2}, 8, ["unknown axis 'model'", "data, pipeline, fsdp, expert, tensor"]),
        ({"tensor": 0, "data": -1}, 8, ["axis 'tensor' has size 0", "positive integers", "-1"]),
        ({"expert": -2, "data": -1}, 8, ["axis 'expert' has size -2"]),
        ({"fsdp": 2.0, "data": -1}, 8, ["axis 'fsdp' has size 2.0"]),
        ({"pipeline": True, "data": -1}, 8, ["axis 'pipeline' has size True"]),
        ({"data": -1, "fsdp": -1}, 8, ["'data' and 'fsdp'", "at most one axis may be -1"]),
        (
            {"data": 4, "tensor": 4},
            8,
            ["product of axis sizes data=4 × tensor=4 = 16 does not equal the 8 available devices", "-1"],
        ),
        ({"data": -1, "tensor": 3}, 8, ["tensor=3 = 3 does not divide the 8", "'data=-1' cannot fill"]),
        ({"data": 2}, 8, ["data=2 = 2 does not equal the 8"]),
        ({"data": -1}, 0, ["number of devices must be a positive integer"]),
        ([("data", 2)], 8, ["must be a mapping"]),
    ],
)
def test_bad_sizes_name_the_axis_and_the_fix(sizes, n, expected):
    with pytest.raises(MeshError) as caught:
        resolve_axis_sizes(sizes, n)
    assert isinstance(caught.value, ValueError)
    for fragment in expected:
        assert fragment in str(caught.value)


def test_numpy_integer_sizes_are_accepted():
    assert resolve_axis_sizes({"data": np.int64(2), "tensor": -1}, 8)["tensor"] == 4


# ---- mesh and device order --------------------------------------------------------------------------------


def test_mesh_has_every_axis_and_row_major_device_order():
    mesh = build_mesh({"data": 2, "fsdp": 2, "tensor": -1})
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 2, "pipeline": 1, "fsdp": 2, "expert": 1, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # tensor neighbours are consecutive device ids; data is the outermost (largest stride) axis.
    for d, f, t in itertools.product(range(2), range(2), range(2)):
        assert ids[d, 0, f, 0, t] == 4 * d + 2 * f + t
    assert tuple(mesh.axis_types) == (jax.sharding.AxisType.Auto,) * len(AXES)


def test_tensor_groups_are_consecutive_and_data_spans_the_halves():
    mesh = build_mesh({"data": -1, "tensor": 4})
    ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(2, 4)
    assert ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_default_devices_sort_by_process_then_id(monkeypatch):
    ordered = fake_devices(2, 3)
    shuffled = [ordered[i] for i in (4, 0, 5, 2, 1, 3)]
    monkeypatch.setattr(jax, "devices", lambda: shuffled)
    assert default_devices() == ordered


def test_explicit_devices_keep_their_order():
    devices = list(reversed(jax.devices()))
    mesh = build_mesh({"tensor": 8}, devices=devices)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]
    with pytest.raises(MeshError, match="repeats a device"):
        build_mesh({"tensor": 2}, devices=[jax.devices()[0]] * 2)


def test_every_axis_name_can_shard_a_computation():
    mesh = build_mesh({"data": 2, "expert": 2, "tensor": 2})
    x = jnp.arange(64.0).reshape(8, 8)
    spec = P(("data", "pipeline", "fsdp"), ("expert", "tensor"))
    y = jax.device_put(x, NamedSharding(mesh, spec))
    assert len(y.addressable_shards) == 8
    np.testing.assert_allclose(jax.jit(lambda a: (a * 2).sum(axis=0))(y), (x * 2).sum(axis=0))


def test_topology_of_another_size_is_refused():
    with pytest.raises(MeshError, match="describes 512 devices but the mesh has 8"):
        build_mesh({"data": -1}, load_topology("multi_rack"))


def test_warns_when_tensor_leaves_the_fastest_tier():
    topology = tiers_of(4, 8)
    with pytest.warns(MeshLayoutWarning, match="tensor axis \\(size 8\\) crosses tier 't1'"):
        build_mesh({"tensor": 8}, topology)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_mesh({"data": 2, "tensor": 4}, topology)
        build_mesh({"data": -1}, topology)  # tensor=1 communicates nowhere


# ---- tiers crossed ----------------------------------------------------------------------------------------


def brute_force_tiers(sizes: dict[str, int], topology: Topology) -> dict[str, str | None]:
    """Enumerate every communication group of every axis and find the fastest tier holding each whole."""
    index = np.arange(topology.n_devices).reshape([sizes[a] for a in AXES])
    result = {}
    for k, axis in enumerate(AXES):
        if sizes[axis] == 1:
            result[axis] = None
            continue
        groups = np.moveaxis(index, k, -1).reshape(-1, sizes[axis])
        result[axis] = next(
            t.name for t in topology.tiers if all(len(set(g // t.devices_per_group)) == 1 for g in groups)
        )
    return result


def brute_force_members(sizes: dict[str, int], topology: Topology, axis: str) -> list[int]:
    """For each tier, how many members of one axis group share a tier group (must be the same everywhere)."""
    k = AXES.index(axis)
    index = np.arange(topology.n_devices).reshape([sizes[a] for a in AXES])
    groups = np.moveaxis(index, k, -1).reshape(-1, sizes[axis])
    counts = []
    for tier in topology.tiers:
        per_group = {c for g in groups for c in np.unique(g // tier.devices_per_group, return_counts=True)[1]}
        assert len(per_group) == 1
        counts.append(int(per_group.pop()))
    return counts


def all_layouts(n: int):
    for combo in itertools.product([d for d in range(1, n + 1) if n % d == 0], repeat=len(AXES)):
        if math.prod(combo) == n:
            yield dict(zip(AXES, combo, strict=True))


@pytest.mark.parametrize("preset", ["cpu_host", "h100_host"])
def test_one_tier_presets(preset):
    topology = load_topology(preset)
    only = topology.tiers[0].name
    assert axis_tiers({"data": 2, "fsdp": 2, "tensor": 2}, topology) == dict(
        data=only, pipeline=None, fsdp=only, expert=None, tensor=only
    )
    assert axis_tiers({"expert": -1}, topology)["expert"] == only


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ({"data": -1, "tensor": 8}, dict(data="ethernet", tensor="nvlink")),
        ({"data": 2, "fsdp": 32, "tensor": 8}, dict(data="ethernet", fsdp="infiniband", tensor="nvlink")),
        (
            {"data": 4, "pipeline": 4, "fsdp": 4, "expert": 2, "tensor": 4},
            dict(data="ethernet", pipeline="infiniband", fsdp="infiniband", expert="nvlink", tensor="nvlink"),
        ),
        ({"data": -1, "tensor": 16}, dict(data="ethernet", tensor="infiniband")),
        ({"pipeline": 2, "tensor": -1}, dict(pipeline="ethernet", tensor="infiniband")),
        ({"data": 256, "pipeline": 2}, dict(data="ethernet", pipeline="nvlink")),
        ({"data": 64, "expert": 8}, dict(data="ethernet", expert="nvlink")),
        ({"fsdp": 4, "expert": 64, "tensor": 2}, dict(fsdp="ethernet", expert="infiniband", tensor="nvlink")),
        ({"data": -1}, dict(data="ethernet")),
    ],
)
def test_multi_rack_tiers(sizes, expected):
    topology = load_topology("multi_rack")
    assert topology.n_devices == 512
    got = axis_tiers(sizes, topology)
    assert got == {axis: expected.get(axis) for axis in AXES}
    assert got == brute_force_tiers(resolve_axis_sizes(sizes, 512), topology)


@pytest.mark.parametrize("group_sizes", [(8,), (2, 8), (4, 8), (2, 4, 8), (2, 6, 12), (3, 12), (4, 12), (6, 24)])
def test_axis_tiers_match_brute_force_on_every_layout(group_sizes):
    topology = tiers_of(*group_sizes)
    layouts = list(all_layouts(topology.n_devices))
    assert layouts
    for sizes in layouts:
        assert axis_tiers(sizes, topology) == brute_force_tiers(sizes, topology), sizes


def test_tier_split_on_multi_rack():
    topology = load_topology("multi_rack")
    split = axis_tier_split({"data": -1, "tensor": 8}, topology)
    assert split["data"] == [("infiniband", 32), ("ethernet", 2)]
    assert split["tensor"] == [("nvlink", 8)]
    assert split["fsdp"] == []
    split = axis_tier_split({"data": 4, "fsdp": 16, "tensor": 8}, topology)
    assert split["fsdp"] == [("infiniband", 16)]
    assert split["data"] == [("infiniband", 2), ("ethernet", 2)]
    split = axis_tier_split({"data": 2, "expert": 64, "tensor": 4}, topology)
    assert split["expert"] == [("nvlink", 2), ("infiniband", 32)]


@pytest.mark.parametrize("group_sizes", [(2, 8), (2, 4, 8), (2, 6, 12), (4, 12), (6, 24)])
def test_tier_split_matches_brute_force_or_refuses_uneven(group_sizes):
    topology = tiers_of(*group_sizes)
    refused = 0
    for sizes in all_layouts(topology.n_devices):
        try:
            split = axis_tier_split(sizes, topology)
        except MeshError as err:
            assert "splits unevenly" in str(err)
            refused += 1
            with pytest.raises(AssertionError):  # brute force agrees that some axis is uneven
                for axis in AXES:
                    brute_force_members(sizes, topology, axis)
            continue
        tiers = axis_tiers(sizes, topology)
        for axis in AXES:
            counts = brute_force_members(sizes, topology, axis)
            expected = [
                (t.name, c // p) for t, c, p in zip(topology.tiers, counts, [1, *counts[:-1]], strict=True) if c > p
            ]
            assert split[axis] == expected, (sizes, axis)
            assert math.prod(f for _, f in split[axis]) == sizes[axis]
            assert (split[axis][-1][0] if split[axis] else None) == tiers[axis]
    if group_sizes in [(2, 6, 12), (4, 12), (6, 24)]:
        assert refused  # these have layouts that straddle a tier unevenly


# ---- topology files ---------------------------------------------------------------------------------------


def test_presets_load():
    assert set(preset_names()) >= {"cpu_host", "h100_host", "multi_rack"}
    assert load_topology("cpu_host").n_devices == 8
    h100 = load_topology("h100_host")
    assert h100.tiers == (Tier("nvlink", 8, 450.0, 3.0),)
    assert [t.name for t in load_topology("multi_rack").tiers] == ["nvlink", "infiniband", "ethernet"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        h100.name = "x"


def test_load_by_path_and_auto(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("tiers:\n  - {name: a, devices_per_group: 8, bandwidth_gbps: 1, latency_us: 2}\n")
    topology = load_topology(str(path))
    assert topology.name == "mine" and topology.source == str(path)
    assert load_topology("auto").n_devices == len(jax.devices())


def test_unknown_preset_lists_the_presets():
    with pytest.raises(TopologyError, match="no such preset.*h100_host"):
        load_topology("h100")


GOOD_TIER = {"name": "fast", "devices_per_group": 4, "bandwidth_gbps": 100, "latency_us": 1}


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"tiers": [GOOD_TIER], "nodes": 3}, ["unknown key(s) ['nodes']", "allowed keys are"]),
        (
            {"tiers": [{**GOOD_TIER, "bandwith_gbps": 3}]},
            ["tier 0 ('fast')", "unknown key(s) ['bandwith_gbps']", "bandwidth_gbps"],
        ),
        (
            {"tiers": [{k: v for k, v in GOOD_TIER.items() if k != "latency_us"}]},
            ["missing field 'latency_us'"],
        ),
        ({"tiers": []}, ["non-empty list"]),
        ({"name": "x"}, ["missing 'tiers'"]),
        (
            {"tiers": [GOOD_TIER, {**GOOD_TIER, "name": "slow", "devices_per_group": 4}]},
            ["tier 1 ('slow')", "'devices_per_group' is 4, not larger than 4", "must grow"],
        ),
        (
            {"tiers": [GOOD_TIER, {**GOOD_TIER, "name": "slow", "devices_per_group": 6}]},
            ["tier 1 ('slow')", "'devices_per_group' is 6, not a multiple of 4", "'fast'"],
        ),
        ({"tiers": [{**GOOD_TIER, "devices_per_group": 0}]}, ["tier 0 ('fast')", "'devices_per_group' is 0"]),
        (
            {"tiers": [{**GOOD_TIER, "devices_per_group": 4.5}]},
            ["'devices_per_group' is 4.5", "positive integer"],
        ),
        (
            {"tiers": [{**GOOD_TIER, "bandwidth_gbps": 0}]},
            ["tier 0 ('fast')", "'bandwidth_gbps' is 0", "positive"],
        ),
        ({"tiers": [{**GOOD_TIER, "latency_us": -1.0}]}, ["'latency_us' is -1.0", "positive number"]),
        ({"tiers": [{**GOOD_TIER, "latency_us": True}]}, ["'latency_us' is True"]),
        ({"tiers": [{**GOOD_TIER, "bandwidth_gbps": "fast"}]}, ["'bandwidth_gbps' is 'fast'"]),
        ({"tiers": [GOOD_TIER, {**GOOD_TIER, "devices_per_group": 8}]}, ["tier 1 ('fast')", "unique"]),
        ({"tiers": [GOOD_TIER, "slow"]}, ["tier 1", "expected a mapping"]),
    ],
)
def test_topology_errors_name_file_tier_and_field(tmp_path, raw, expected):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TopologyError) as caught:
        load_topology(str(path))
    message = str(caught.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_topology_built_in_code_is_validated_too():
    with pytest.raises(TopologyError, match="'devices_per_group' is 12, not a multiple of 8"):
        Topology("x", (Tier("a", 8, 1.0, 1.0), Tier("b", 12, 1.0, 1.0)))
    with pytest.raises(TopologyError, match="expected a mapping"):
        topology_from_dict(None)
    assert topology_from_dict({"tiers": [GOOD_TIER]}).n_devices == 4


def test_auto_topology_from_processes():
    two_hosts = Topology.auto(fake_devices(2, 4))
    assert [(t.name, t.devices_per_group) for t in two_hosts.tiers] == [("local", 4), ("network", 8)]
    assert two_hosts.tiers[0].bandwidth_gbps == 450.0  # H100 device kind
    one_host = Topology.auto(fake_devices(1, 8, platform="cpu"))
    assert [(t.name, t.devices_per_group) for t in one_host.tiers] == [("local", 8)]
    single = Topology.auto(fake_devices(4, 1))
    assert [(t.name, t.devices_per_group) for t in single.tiers] == [("network", 4)]
    with pytest.raises(TopologyError, match="different numbers of devices"):
        Topology.auto(fake_devices(2, 4)[:-1])


# ---- description ------------------------------------------------------------------------------------------


def table_row(text: str, first_cell: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [first_cell])


def test_describe_names_every_axis_tier_and_device():
    topology = load_topology("cpu_host")
    mesh = build_mesh({"data": 2, "tensor": 4}, topology)
    text = describe_mesh(mesh, topology)
    for axis in AXES:
        assert table_row(text, axis)[0] == axis
    assert table_row(text, "data")[1:5] == ["2", "4", "host", "10"]
    assert table_row(text, "pipeline")[1:4] == ["1", "4", "-"]
    assert table_row(text, "tensor")[1:4] == ["4", "1", "host"]
    assert table_row(text, "5") == ["5", "0", "cpu", "1", "0", "0", "0", "1"]
    assert len([line for line in text.splitlines() if line.split()[-1:] and line.split()[0].isdigit()]) == 8
    assert "local" in describe_mesh(mesh)  # auto topology when none is given


def test_describe_a_multi_rack_layout():
    topology = load_topology("multi_rack")
    sizes = resolve_axis_sizes({"data": 2, "fsdp": -1, "tensor": 8}, 512)
    devices = np.empty(512, dtype=object)
    devices[:] = fake_devices(64, 8)
    mesh = SimpleNamespace(axis_names=AXES, shape=sizes, devices=devices.reshape([sizes[a] for a in AXES]))
    text = describe_mesh(mesh, topology)
    assert table_row(text, "data")[1:6] == ["2", "256", "ethernet", "12.5", "30"]
    assert table_row(text, "fsdp")[1:5] == ["32", "8", "infiniband", "50"]
    assert table_row(text, "tensor")[1:5] == ["8", "1", "nvlink", "450"]
    # linear position 63 * 8 + 1 = 505 = 1 * 256 + 31 * 8 + 1
    assert table_row(text, "63001") == ["63001", "63", "gpu", "1", "0", "31", "0", "1"]
    assert "not in (process, id) order" not in text
    devices[[0, 1]] = devices[[1, 0]]
    assert "not in (process, id) order" in describe_mesh(mesh, topology)
