"""pdeq_jax: quantized CNNs and GCNs through the lens of PDEs, in JAX/Flax.

Reimplements Ben-Yair, Ben Shalom, Eliasof & Treister, "Quantized convolutional
neural networks through the lens of partial differential equations" (Research in
the Mathematical Sciences 9, 58, 2022).
"""

__version__ = "0.1.0"
