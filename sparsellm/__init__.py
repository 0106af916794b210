"""sparsellm: one-shot pruning of causal language models (SparseLLM, SparseGPT, Wanda, magnitude)."""

from .api import PROTOCOLS, PruneConfig, RecoverConfig, Report, evaluate, prune, recover
from .core import __version__
from .core.errors import UserError
from .models.loading import load

perplexity = evaluate

__all__ = ["PROTOCOLS", "PruneConfig", "RecoverConfig", "Report", "UserError", "__version__", "evaluate", "load",
           "perplexity", "prune", "recover"]  # fmt: skip
