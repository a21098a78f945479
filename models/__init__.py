"""Reference models, samplers and checkpoint loading."""

from .checkpoint import CheckpointError, load_checkpoint
from .dit_moe import DiTMoE, DiTMoEConfig, config_for, dit_moe
from .pretrained import digits_dataset, pretrained
from .sampling import initial_noise, rectified_flow_sample

__all__ = ["CheckpointError", "DiTMoE", "DiTMoEConfig", "config_for", "digits_dataset", "dit_moe", "initial_noise",
           "load_checkpoint", "pretrained", "rectified_flow_sample"]
