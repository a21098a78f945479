"""Graph passes, one technique per module; each is `fn(gm, ctx) -> PassResult`."""

from .expert_parallel import expert_parallel

__all__ = ["expert_parallel"]
