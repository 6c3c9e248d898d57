"""DeepSeek-V3 family: multi-head latent attention, DeepSeekMoE with aux-loss-free balancing, MTP."""

from jaxdeep.model.deepseek.model import DeepSeekModel, ModelOutput
from jaxdeep.model.deepseek.router import RoutingBias

__all__ = ["DeepSeekModel", "ModelOutput", "RoutingBias"]
