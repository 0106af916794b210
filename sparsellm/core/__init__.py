"""The shared leaf: what every room of the house uses; it imports no other sparsellm package."""

__version__ = "0.1.0"
