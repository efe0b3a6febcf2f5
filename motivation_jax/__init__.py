"""motivation_jax: motivated training in JAX/Flax (arXiv 2602.21064).

A small base network trains on every batch; a larger motivated network that
extends it, sharing one parameter pytree, trains on the batches where a
host-side motivation condition fires. See README.md.
"""

__version__ = "0.1.0"
