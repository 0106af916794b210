"""sparsellm: one-shot pruning of causal language models (SparseLLM, SparseGPT, Wanda, magnitude)."""

__version__ = "0.1.0"

from .api import PROTOCOLS, PruneConfig, Report, evaluate, prune  # noqa: E402
from .errors import UserError  # noqa: E402
from .models.loading import load  # noqa: E402

perplexity = evaluate

__all__ = ["PROTOCOLS", "PruneConfig", "Report", "UserError", "evaluate", "load", "perplexity", "prune"]
