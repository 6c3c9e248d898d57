"""Hugging Face interop for DeepSeek checkpoints (`config.json` + safetensors, one file or sharded).

    model, config = jaxdeep.hf.load("path/to/DeepSeek-V3-format-dir", mesh=mesh)
    logits = model(input_ids)            # [batch, seq, vocab], float32
    jaxdeep.hf.save(model, "out/dir")    # the same format back

`load` places every tensor straight into its sharding on the mesh: each device's block is read from the
files on its own (`jax.make_array_from_callback`), so no host ever holds the whole model.
"""

from jaxdeep.hf.convert import load, save
from jaxdeep.hf.model import HFModel

__all__ = ["HFModel", "load", "save"]
