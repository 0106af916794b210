"""Recovery: fine-tune a pruned model with its zeros held fixed, distilling from the dense model (trainer.py)."""
