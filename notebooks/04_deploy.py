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
# # From a trained 4W4A network to an integer model in onnxruntime
#
# A quantization-aware-trained ResNet is still float32 inside the training
# loop (fake quantization).  `train.export` turns a finished run into an
# *integer* program (`pdeq_jax.deploy`): int8 weight codes, unsigned
# activation codes, int32 accumulators, BatchNorm, residual additions and
# pooling folded into integer requantization; only the input quantization and
# the final logits are float.  It writes the ONNX model, a compact checkpoint
# (packed codes) and `deploy.md`.  This notebook exports a run, shows the
# report, and runs the exported model with onnxruntime next to the JAX
# integer program and the fake-quant model.

# %%
# Installs pdeq-jax (with onnx/onnxruntime): inside a checkout of the
# repository it installs that checkout; elsewhere (Colab) from REPO_URL.
REPO_URL = "https://github.com/pdeq-jax/pdeq-jax"  # <- the repository address
import importlib.util, pathlib, subprocess, sys
if importlib.util.find_spec("pdeq_jax") is None or importlib.util.find_spec("onnxruntime") is None:
  _checkout = next((p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
                    if (p / "pyproject.toml").exists() and (p / "pdeq_jax").is_dir()), None)
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         *(["-e", f"{_checkout}[deploy]"] if _checkout else [f"pdeq-jax[deploy] @ git+{REPO_URL}"])])
  if "google.colab" in sys.modules:  # tfds needs TensorFlow to prepare CIFAR-10
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "tensorflow-cpu"])

# %% tags=["parameters"]
RUN_WORKDIR = ""             # a finished 4W4A CIFAR run to export; "" trains one below
MODEL = "resnet20"           # the network trained when RUN_WORKDIR is ""
DATASET = "cifar10"          # "cifar10" (tfds, online) or "cifar10_jpeg" (offline copy)
PRECISION = "4w4a"
NUM_EPOCHS = 30
START_BITS = 8               # gradual schedule: START_BITS, one bit less every
EPOCHS_PER_STEP = 2          #   EPOCHS_PER_STEP epochs, down to the target
BATCH_SIZE = 128
MAX_TRAIN = 0                # 0 = the whole training split
VAL_FRACTION = 0.1
MAX_TEST = 0                 # test images the export is checked on (0 = all)
WORKDIR = "workdirs/nb04"

# %%
import pathlib

from IPython.display import Markdown, display
import jax
import matplotlib.pyplot as plt
import numpy as np
import onnxruntime

from configs import cifar
from pdeq_jax import layers
from pdeq_jax.deploy import pack
from pdeq_jax.deploy import program as integer_program
from train import classify, export, validate

print("devices:", jax.devices(), " onnxruntime", onnxruntime.__version__)

# %% [markdown]
# ## A trained 4W4A run
#
# With `RUN_WORKDIR` empty, a network is trained here with the project's
# trainer (the program behind `python -m train.main`); a finished run from
# elsewhere works the same.

# %%
if RUN_WORKDIR:
  run_dir = pathlib.Path(RUN_WORKDIR)
else:
  config = cifar.get_config(f"{MODEL},{DATASET},{PRECISION}")
  config.num_epochs = NUM_EPOCHS
  config.quant.start_bits = START_BITS
  config.quant.epochs_per_step = EPOCHS_PER_STEP
  config.batch_size = BATCH_SIZE
  config.data.max_train = MAX_TRAIN
  config.data.val_fraction = VAL_FRACTION
  config.consistency.enabled = False
  validate.config(config)
  run_dir = pathlib.Path(WORKDIR) / "run"
  classify.train_and_evaluate(config, str(run_dir))

# %% [markdown]
# ## Export
#
# The same as `python -m train.export --workdir=<run> --format=onnx
# --output=<dir>`: the integer program, `model.onnx`, the compact checkpoint
# `model.pdeq` and `deploy.md` (accuracy of every path, agreement with the
# fake-quant model, exactness of onnxruntime, sizes, accumulator widths).

# %%
out_dir = pathlib.Path(WORKDIR) / "export"
summary = export.export(str(run_dir), "onnx", str(out_dir), max_test=MAX_TEST)
display(Markdown((out_dir / "deploy.md").read_text()))

# %% [markdown]
# ## The exported model on its own
#
# onnxruntime reads `model.onnx` and nothing else; the JAX integer program
# is rebuilt from the compact checkpoint alone.  Both take the normalised
# float32 batch and return float32 logits, and they agree exactly.

# %%
config, variables, bits, _ = export.load_run(str(run_dir))
data = classify.load_data(config)
images = data.test_images[:8]
x = ((images.astype(np.float32) / 255.0 - data.mean) / data.std).astype(np.float32)

session = onnxruntime.InferenceSession(str(out_dir / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
logits_onnx = session.run(None, {session.get_inputs()[0].name: x})[0]
logits_int = np.asarray(integer_program.run(pack.load(out_dir / "model.pdeq"), x))
model = classify.create_model(config, data.num_classes)
logits_fake = np.asarray(model.apply(variables, x, layers.QuantBits.make(*bits)))
print("onnxruntime == JAX integer program, every logit:", np.array_equal(logits_onnx, logits_int))
print("top-1, fake-quant vs integer:", np.argmax(logits_fake, -1), np.argmax(logits_int, -1))

fig, axes = plt.subplots(1, len(images), figsize=(2 * len(images), 2.6))
for ax, image, label, logit in zip(axes, images, data.test_labels, logits_onnx):
  ax.imshow(image); ax.axis("off")
  ax.set_title(f"{data.class_names[int(np.argmax(logit))]}\n(true: {data.class_names[int(label)]})", fontsize=9)
plt.tight_layout(); plt.show()

size = {"compact checkpoint": (out_dir / "model.pdeq").stat().st_size,
        "model.onnx": (out_dir / "model.onnx").stat().st_size,
        "float32 parameters": summary["float32_bytes"]}
for name, n in size.items():
  print(f"{name:20s} {n / 1024:8.1f} KiB")
