# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # pdeq-jax quickstart: the library in pictures
#
# Three ideas of *Quantized convolutional neural networks through the lens of
# partial differential equations* (Ben-Yair et al., 2022), each computed with
# the library's own functions:
#
# 1. the fake quantizer of Eq. 9 (levels, clipping) and its learned-clipping
#    gradient of Eq. 11;
# 2. total-variation (TV) smoothing, Eq. 14, of a real CIFAR-10 image and what
#    it does to the 4-bit quantization error (the paper's Fig. 2);
# 3. a symmetric step `x - h Kᵀ σ(K x)` whose `Kᵀ` comes from `jax.vjp`, and
#    its stability margin `h ‖K‖² < 2`.
#
# Runs on a CPU in under two minutes.

# %%
# Installs pdeq-jax: inside a checkout of the repository it installs that
# checkout; elsewhere (Colab) it installs from REPO_URL.
REPO_URL = "https://github.com/pdeq-jax/pdeq-jax"  # <- the repository address
import importlib.util, pathlib, subprocess, sys
if importlib.util.find_spec("pdeq_jax") is None:
  _checkout = next((p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
                    if (p / "pyproject.toml").exists() and (p / "pdeq_jax").is_dir()), None)
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         *(["-e", str(_checkout)] if _checkout else [f"git+{REPO_URL}"])])
  if "google.colab" in sys.modules:  # tfds needs TensorFlow to prepare CIFAR-10
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "tensorflow-cpu"])

# %% tags=["parameters"]
BITS = 4                     # quantizer bits of the plots and of the Fig. 2 error
DATASET = "cifar10"          # "cifar10" (tfds, online) or "cifar10_jpeg" (offline copy)
IMAGE_INDEX = 7              # which test image is smoothed
TV_GAMMA_SQ = 0.01           # γ² of the TV step (Eq. 14)
TV_STEPS = (0, 1, 3, 10)     # numbers of TV steps shown
STEP_SIZES = (0.5, 1.0, 1.5, 1.9, 2.1, 2.5, 3.0)  # h of the symmetric-step demo (‖K‖₂ = 1)

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from pdeq_jax import operators, quant
from pdeq_jax.data import images
from train import fig2_tv

print("JAX", jax.__version__, "devices:", jax.devices())

# %% [markdown]
# ## 1. The quantizer (Eq. 9) and its α-gradient (Eq. 11)
#
# `quant.quantize(x, alpha, bits, signed=...)` clips `x` to `[-α, α]` (signed,
# for weights) or `[0, α]` (unsigned, after a ReLU) and rounds to a uniform
# grid of `2^b - 1` steps.  Its backward pass is the straight-through
# estimator inside the clipping range; the clipping scale α is learned with
# the gradient of Eq. 11, which is the rounding residual inside the range and
# `±1` outside.

# %%
xs = jnp.linspace(-1.6, 1.6, 801)
alpha = 1.0
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for bits in (2, 3, BITS):
  axes[0].plot(xs, quant.quantize(xs, alpha, bits, signed=True), label=f"{bits} bits")
  axes[1].plot(xs, quant.quantize(xs, alpha, bits, signed=False), label=f"{bits} bits")
axes[0].plot(xs, quant.quantize(xs, alpha, None, signed=True), "k:", label="clip only")
axes[0].set_title("signed (weights): Q(x), α = 1")
axes[1].set_title("unsigned (activations): Q(x), α = 1")


def q_of_alpha(a, x):
  return quant.quantize(x, a, BITS, signed=True)


dq_dalpha = jax.vmap(jax.grad(q_of_alpha), in_axes=(None, 0))(alpha, xs)
dq_dx = jax.vmap(jax.grad(q_of_alpha, argnums=1), in_axes=(None, 0))(alpha, xs)
axes[2].plot(xs, dq_dalpha, label="∂Q/∂α (Eq. 11)")
axes[2].plot(xs, dq_dx, "--", label="∂Q/∂x (STE)")
axes[2].set_title(f"gradients, {BITS} bits signed")
for ax in axes:
  ax.set_xlabel("x"); ax.grid(alpha=0.3); ax.legend()
plt.tight_layout(); plt.show()

# %% [markdown]
# The integer codes behind a quantized tensor (`quant.to_integer`) reproduce
# it exactly: `codes * scale == quantize(x)`.

# %%
w = jax.random.normal(jax.random.PRNGKey(0), (6,)) * 0.5
codes, scale = quant.to_integer(w, 1.0, BITS, signed=True)
print("w     ", np.round(np.asarray(w), 3))
print("codes ", np.asarray(codes), " scale", float(scale))
assert np.array_equal(np.asarray(codes * scale), np.asarray(quant.quantize(w, 1.0, BITS, signed=True)))

# %% [markdown]
# ## 2. TV smoothing of a real image and its 4-bit error (Fig. 2)
#
# One TV step `S(x) = x - γ² (D_x + D_y) x` flattens small oscillations and
# keeps edges.  A smoother map has fewer distinct values to represent, so its
# quantization error drops.  Here each colour channel of a CIFAR-10 test image
# (pixel values in [0, 1]) is smoothed and quantized to `BITS` bits with α its
# maximum, the statistics coming from `train.fig2_tv.tv_quantization_effect`.

# %%
data = images.load_image_dataset(DATASET, val_fraction=0.0, max_train=10)
image = data.test_images[IMAGE_INDEX].astype(np.float32) / 255.0
effect = fig2_tv.tv_quantization_effect(image, TV_GAMMA_SQ, steps=TV_STEPS,
                                        bits=BITS, return_maps=True)
print(f"{data.class_names[data.test_labels[IMAGE_INDEX]]}; γ² = {TV_GAMMA_SQ}, {BITS} bits")
print("TV steps | quantization MSE | relative MSE | total variation")
for row in effect["rows"]:
  print(f"{row['steps']:8d} | {row['mse']:.3e}        | {row['relative_mse']:.3e}    | {row['total_variation']:.1f}")

fig, axes = plt.subplots(2, len(TV_STEPS), figsize=(3.2 * len(TV_STEPS), 6.5))
for col, n in enumerate(TV_STEPS):
  smoothed = effect["maps"][n]
  a = smoothed.max()
  quantized = np.asarray(quant.quantize(jnp.asarray(smoothed), a, BITS, signed=False))
  axes[0, col].imshow(np.clip(smoothed, 0, 1)); axes[0, col].set_title(f"{n} TV steps")
  err = axes[1, col].imshow(np.abs(smoothed - quantized).mean(-1), cmap="magma", vmin=0, vmax=a / (2 ** BITS - 1) / 2)
  axes[1, col].set_title(f"|{BITS}-bit error|\nMSE {effect['rows'][col]['mse']:.2e}")
for ax in axes.ravel():
  ax.axis("off")
plt.colorbar(err, ax=axes[1].tolist(), shrink=0.8)
plt.show()

# %% [markdown]
# ## 3. A symmetric step, `Kᵀ` from `jax.vjp`, and its stability margin
#
# The stable networks replace a residual block with `x - h Kᵀ σ(K x)`.  Only
# `K` is a parameter: `Kᵀ` is the vector-Jacobian product of the convolution
# (`operators.symmetric_step`).  With `σ` monotone and `σ' ≤ L`, the step is
# non-expansive when `h L ‖K‖₂² < 2` (`operators.stability_margin`): the
# distance between two inputs never grows.  Below, `K` is a random 3×3
# convolution scaled to `‖K‖₂ = 1`, so `h‖K‖² = h`.  With `σ` the identity
# (`σ' = 1` everywhere, the worst case) the bound is sharp: twenty steps shrink
# the distance of two inputs for `h < 2` and blow it up beyond.  A ReLU
# switches part of `K` off, so it stays contractive further.

# %%
key_x, key_k, key_d = jax.random.split(jax.random.PRNGKey(1), 3)
x = jax.random.normal(key_x, (1, 16, 16, 8))
kernel = jax.random.normal(key_k, (3, 3, 8, 8))
kernel = kernel / operators.stability_margin(kernel, x.shape, 1.0).spectral_norm

# Kᵀ really is the adjoint: <K x, y> = <x, Kᵀ y>
y = jax.random.normal(key_d, x.shape)
k_x, k_transpose = jax.vjp(lambda v: operators.conv(v, kernel), x)
(kt_y,) = k_transpose(y)
print("<Kx, y> =", float(jnp.vdot(k_x, y)), " <x, Kᵀy> =", float(jnp.vdot(x, kt_y)))


def distance_growth(h, act, steps=20):
  """‖f(x) - f(x')‖ / ‖x - x'‖ after `steps` symmetric steps with the same K."""
  x2 = x + 1e-2 * jax.random.normal(key_d, x.shape)
  a, b = x, x2
  for _ in range(steps):
    a = operators.symmetric_step(a, kernel, h, act)
    b = operators.symmetric_step(b, kernel, h, act)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(x - x2))


rows = []
for h in STEP_SIZES:
  m = operators.stability_margin(kernel, x.shape, h)
  rows.append((float(m.h_l_norm_sq), bool(m.stable),
               distance_growth(h, lambda v: v), distance_growth(h, jax.nn.relu)))
  print(f"h = {h:4}: h‖K‖² = {rows[-1][0]:5.2f}  stable = {rows[-1][1]!s:5}  distance growth "
        f"σ = identity {rows[-1][2]:9.3g}, σ = ReLU {rows[-1][3]:.3g}")

plt.figure(figsize=(5.5, 3.8))
plt.semilogy([r[0] for r in rows], [r[2] for r in rows], "o-", label="σ = identity")
plt.semilogy([r[0] for r in rows], [r[3] for r in rows], "s-", label="σ = ReLU")
plt.axvline(2.0, color="r", ls="--", label="h‖K‖² = 2")
plt.axhline(1.0, color="k", lw=0.8)
plt.xlabel("h ‖K‖₂²"); plt.ylabel("distance growth over 20 steps")
plt.legend(); plt.grid(alpha=0.3); plt.show()
