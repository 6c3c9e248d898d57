"""Topology descriptions: tiers of interconnect from fastest to slowest.

A topology is a list of tiers. Devices are numbered 0..N-1 in (process_index, device id) order, and each
tier cuts that line into aligned groups of `devices_per_group` consecutive devices which talk over that
tier's links. Groups nest: every tier's group size divides the next one's, and the slowest tier's group
holds all N devices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from meshes.errors import TopologyError

PRESET_DIR = Path(__file__).parent / "topologies"

_TOPOLOGY_KEYS = {
    "name": "a short name",
    "description": "free text",
    "tiers": "a list of tiers, fastest first",
}
_TIER_KEYS = {
    "name": "a unique tier name, e.g. nvlink",
    "devices_per_group": "how many consecutive devices share one group of this tier (a positive integer)",
    "bandwidth_gbps": "GB/s per device, one direction (a positive number)",
    "latency_us": "one-message latency in microseconds (a positive number)",
}


@dataclasses.dataclass(frozen=True)
class Tier:
    """One level of interconnect, e.g. NVLink inside a host."""

    name: str  # unique within its topology, e.g. "nvlink"
    devices_per_group: int  # consecutive devices that share one group of this tier
    bandwidth_gbps: float  # GB/s per device, one direction
    latency_us: float  # one-message latency in microseconds


@dataclasses.dataclass(frozen=True)
class Topology:
    """Tiers from fastest (smallest group) to slowest (the group of all devices)."""

    name: str  # preset or file name, or "auto"
    tiers: tuple[Tier, ...]  # fastest first
    source: str = "<code>"  # where it came from; named in error messages
    description: str = ""  # free text

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", tuple(self.tiers))
        _validate(self)

    @property
    def n_devices(self) -> int:
        """Devices in the whole system (the slowest tier's group)."""
        return self.tiers[-1].devices_per_group

    @property
    def fastest(self) -> Tier:
        return self.tiers[0]

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(f"topology {self.name!r} has no tier {name!r}; tiers: {[t.name for t in self.tiers]}")

    def tier_for_block(self, n_consecutive: int) -> Tier:
        """The fastest tier whose groups each hold whole aligned blocks of `n_consecutive` devices.

        Aligned blocks of b devices fit inside aligned groups of g devices exactly when g is a multiple of b.
        """
        if n_consecutive < 1 or self.n_devices % n_consecutive:
            raise ValueError(f"block of {n_consecutive} devices does not divide the {self.n_devices} devices")
        for tier in self.tiers:
            if tier.devices_per_group % n_consecutive == 0:
                return tier
        raise AssertionError("unreachable: the last tier holds all devices")

    @staticmethod
    def auto(devices: Sequence[Any] | None = None) -> Topology:
        """A topology guessed from live jax devices: one tier per process, one "network" tier across them.

        Bandwidths are rough defaults by platform (see `_AUTO_FIGURES`); use a YAML file for real numbers.
        """
        if devices is None:
            import jax

            devices = jax.devices()
        if not devices:
            raise TopologyError("topology auto: no devices given")
        per_process: dict[int, int] = {}
        for device in devices:
            per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
        counts = set(per_process.values())
        if len(counts) != 1:
            raise TopologyError(
                f"topology auto: processes hold different numbers of devices {per_process}; "
                "every process must hold the same number (or describe the topology in a YAML file)"
            )
        local = counts.pop()
        total = len(devices)
        kind = _auto_kind(devices[0])
        local_bw, local_lat, net_bw, net_lat = _AUTO_FIGURES[kind]
        tiers = []
        # A one-device tier has no links to describe; skip it when each process holds one device.
        if local > 1 or total == 1:
            tiers.append(Tier("local", local, local_bw, local_lat))
        if total > local:
            tiers.append(Tier("network", total, net_bw, net_lat))
        return Topology(
            name="auto",
            tiers=tuple(tiers),
            source="<auto>",
            description=f"{len(per_process)} process(es) x {local} {kind} device(s), figures are defaults",
        )


# (local GB/s, local us, network GB/s, network us) per device kind; rough published figures.
_AUTO_FIGURES = {
    "h100": (450.0, 3.0, 50.0, 5.0),
    "a100": (300.0, 3.0, 25.0, 5.0),
    "gpu": (100.0, 5.0, 12.5, 10.0),
    "tpu": (100.0, 2.0, 12.5, 10.0),
    "cpu": (10.0, 1.0, 1.0, 50.0),
}


def _auto_kind(device: Any) -> str:
    kind = str(getattr(device, "device_kind", "")).lower()
    if "h100" in kind or "h200" in kind:
        return "h100"
    if "a100" in kind:
        return "a100"
    platform = str(getattr(device, "platform", "cpu")).lower()
    return platform if platform in _AUTO_FIGURES else "gpu"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_topology(name_or_path: str) -> Topology:
    """Load a preset by name (e.g. "h100_host"), a YAML file by path, or "auto" for the live devices."""
    if name_or_path == "auto":
        return Topology.auto()
    path = Path(name_or_path)
    is_path = path.suffix in (".yaml", ".yml") or len(path.parts) > 1
    if not is_path:
        preset = PRESET_DIR / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise TopologyError(
                f"topology {name_or_path!r}: no such preset; presets are {preset_names()}, "
                "or give 'auto' or a path to a .yaml file"
            )
        path = preset
    if not path.is_file():
        raise TopologyError(f"topology {str(path)!r}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TopologyError(f"topology {str(path)!r}: not valid YAML: {err}") from err
    return topology_from_dict(raw, source=str(path), default_name=path.stem)


def topology_from_dict(raw: Any, source: str = "<dict>", default_name: str = "custom") -> Topology:
    """Build a topology from parsed YAML, naming `source` in every error."""
    where = f"topology {source!r}"
    if not isinstance(raw, dict):
        raise TopologyError(f"{where}: expected a mapping with keys {sorted(_TOPOLOGY_KEYS)}")
    _reject_unknown(raw, _TOPOLOGY_KEYS, where)
    if "tiers" not in raw:
        raise TopologyError(f"{where}: missing 'tiers' ({_TOPOLOGY_KEYS['tiers']})")
    raw_tiers = raw["tiers"]
    if not isinstance(raw_tiers, list) or not raw_tiers:
        raise TopologyError(f"{where}: 'tiers' must be a non-empty list of tiers, fastest first")
    tiers = []
    for index, raw_tier in enumerate(raw_tiers):
        tier_where = f"{where} tier {index}"
        if not isinstance(raw_tier, dict):
            raise TopologyError(f"{tier_where}: expected a mapping with keys {list(_TIER_KEYS)}")
        if isinstance(raw_tier.get("name"), str):
            tier_where += f" ({raw_tier['name']!r})"
        _reject_unknown(raw_tier, _TIER_KEYS, tier_where)
        for key, meaning in _TIER_KEYS.items():
            if key not in raw_tier:
                raise TopologyError(f"{tier_where}: missing field '{key}' ({meaning})")
        tiers.append(Tier(**raw_tier))
    name = raw.get("name", default_name)
    description = raw.get("description", "")
    if not isinstance(name, str) or not isinstance(description, str):
        raise TopologyError(f"{where}: 'name' and 'description' must be strings")
    return Topology(name=name, tiers=tuple(tiers), source=source, description=description or "")


def _reject_unknown(raw: dict, allowed: dict[str, str], where: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise TopologyError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(allowed)}")


def _is_positive_number(value: Any) -> bool:
    # bool is an int subclass; `true` in YAML is not a bandwidth.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _validate(topology: Topology) -> None:
    where = f"topology {topology.source!r}"
    if not topology.tiers:
        raise TopologyError(f"{where}: needs at least one tier")
    seen: set[str] = set()
    previous: Tier | None = None
    for index, tier in enumerate(topology.tiers):
        if not isinstance(tier, Tier):
            raise TopologyError(f"{where} tier {index}: expected a Tier, got {type(tier).__name__}")
        tier_where = f"{where} tier {index} ({tier.name!r})"
        if not isinstance(tier.name, str) or not tier.name:
            raise TopologyError(f"{where} tier {index}: field 'name' must be a non-empty string")
        if tier.name in seen:
            raise TopologyError(f"{tier_where}: field 'name' repeats an earlier tier; names must be unique")
        seen.add(tier.name)
        size = tier.devices_per_group
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise TopologyError(f"{tier_where}: field 'devices_per_group' is {size!r}; it must be a positive integer")
        for field in ("bandwidth_gbps", "latency_us"):
            value = getattr(tier, field)
            if not _is_positive_number(value):
                raise TopologyError(
                    f"{tier_where}: field '{field}' is {value!r}; it must be a positive number ({_TIER_KEYS[field]})"
                )
        if previous is not None:
            if size <= previous.devices_per_group:
                raise TopologyError(
                    f"{tier_where}: field 'devices_per_group' is {size}, not larger than "
                    f"{previous.devices_per_group} of the previous tier {previous.name!r}; tiers go from "
                    "fastest (smallest group) to slowest (all devices), so groups must grow"
                )
            if size % previous.devices_per_group:
                raise TopologyError(
                    f"{tier_where}: field 'devices_per_group' is {size}, not a multiple of "
                    f"{previous.devices_per_group} of the previous tier {previous.name!r}; each group must "
                    "be made of whole groups of the faster tier"
                )
        previous = tier
