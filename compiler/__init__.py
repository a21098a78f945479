"""moedit: a torch.fx pipeline compiler and runtime for parallel MoE-DiT inference.

    compiled = moedit.compile(model, moedit.Plan.from_file("examples/plans/sync_ep.yaml"))
    print(compiled.explain())
    runner = compiled.to_runtime()          # under torchrun
    images = runner.sample(labels, steps=50, cfg_scale=1.5, seed=0)

    pipe = moedit.parallelize(diffusers_pipeline, "examples/plans/sync_ep.yaml")   # under torchrun
"""

from moedit.runtime.comm import CollectiveError

from .adapters import (AttentionAdapter, MoEAdapter, Streams, register_adapter, register_attention, register_batch_dims,
                       register_leaf)
from .compiled import CompiledModel, compile
from .parallelize import ParallelTransformer, parallelize
from .plan import Plan, PlanError
from .steps import StepKind
from .tracer import TraceError

__all__ = ["AttentionAdapter", "CollectiveError", "CompiledModel", "MoEAdapter", "ParallelTransformer", "Plan", "PlanError",
           "StepKind", "Streams", "TraceError", "compile", "parallelize", "register_adapter", "register_attention",
           "register_batch_dims", "register_leaf"]
