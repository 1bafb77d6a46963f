"""tanglenas: gradient-based neural architecture search with weight entanglement, in JAX/Flax NNX."""

__version__ = "0.1.0"
