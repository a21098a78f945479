"""Reference models, shipped checkpoints and how they load, and the digits metrics.

Importing this package registers the reference DiT-MoE's adapter with moedit."""

from .checkpoint import CheckpointError, load_checkpoint
from .dit_moe import DiTMoE, DiTMoEConfig, config_for, dit_moe
from .pretrained import digits_dataset, load_model, pretrained

__all__ = ["CheckpointError", "DiTMoE", "DiTMoEConfig", "config_for", "digits_dataset", "dit_moe", "load_checkpoint",
           "load_model", "pretrained"]
