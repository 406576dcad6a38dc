"""Deployable integer models: conversion, execution, packing and export.

* :mod:`pdeq_jax.deploy.convert`: trained variables -> integer program;
* :mod:`pdeq_jax.deploy.program`: its requantization rule and JAX executor;
* :mod:`pdeq_jax.deploy.pack`: the compact checkpoint (packed codes);
* :mod:`pdeq_jax.deploy.onnx_export`: ONNX (ConvInteger) export;
* :mod:`pdeq_jax.deploy.stablehlo`: ``jax.export`` artifact and loader.
"""

