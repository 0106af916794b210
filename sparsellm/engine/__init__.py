"""The layer-wise engine: sequential pruning, statistics, checkpoints, data-parallel sums."""

CHECKPOINT_EVERY = 60.0  # seconds between checkpoint writes by default: the CLI, api.prune and Checkpoint share it
