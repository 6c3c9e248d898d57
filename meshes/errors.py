"""Errors raised for bad mesh or topology input; both are ValueErrors so callers may catch either."""


class MeshError(ValueError):
    """Axis sizes, devices or a topology that cannot make a mesh; the message names the field and the fix."""


class TopologyError(MeshError):
    """A topology description that is malformed; the message names the file, the tier and the field."""
