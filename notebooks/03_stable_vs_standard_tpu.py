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
# # Stable vs standard ResNet at 4W4A, on every device JAX sees
#
# Trains ResNet-20 and Stable ResNet-20 (symmetric steps, `Kᵀ` from
# `jax.vjp`) with 4-bit weights and activations and the gradual bit schedule,
# through the project's own image trainer (`train.classify`, the program
# behind `python -m train.main --config=configs/cifar.py:...`).  The trainer
# puts the devices in a 1-D data-parallel `Mesh` and shards every batch over
# it: the TPU cores of a Colab TPU runtime, a GPU, or CPU devices.  Then it
# shows the consistency report of Tables 4/5 and the per-block MSE plot of
# Fig. 3.
#
# On Colab choose *Runtime → Change runtime type → TPU* (or a GPU); CIFAR-10
# comes through tensorflow-datasets there.  On a CPU, `CPU_DEVICES` CPU
# devices are created so that the sharding is real.

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
DATASET = "cifar10"          # "cifar10" (tfds, online) or "cifar10_jpeg" (offline copy)
MODELS = ("resnet20", "stable_resnet20")
PRECISION = "4w4a"
NUM_EPOCHS = 60              # the paper trains 400; 60 shows the trend on one TPU chip
START_BITS = 8               # gradual schedule: START_BITS, then one bit less every
EPOCHS_PER_STEP = 5          #   EPOCHS_PER_STEP epochs down to the target
BATCH_SIZE = 128             # global batch, split over the devices
MAX_TRAIN = 0                # 0 = the whole training split (45,000 after validation)
MAX_TEST = 0                 # 0 = the whole test set
VAL_FRACTION = 0.1
CONSISTENCY_EXAMPLES = 0     # test images of the consistency report (0 = all)
CPU_DEVICES = 8              # CPU devices created when JAX runs on the CPU
WORKDIR = "workdirs/nb03"

# %%
import os

# Only the CPU platform reads this flag; TPUs and GPUs are used as they are.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={CPU_DEVICES}")

import pathlib

from IPython.display import Image, Markdown, display
import jax
import numpy as np

from configs import cifar
from train import classify, consistency_report, validate

devices = jax.devices()
print(f"{len(devices)} × {devices[0].device_kind} ({jax.default_backend()}), "
      f"{jax.process_count()} process(es)")

# %% [markdown]
# ## The mesh and a sharded batch
#
# `classify.make_mesh()` is the trainer's mesh: one `data` axis over all
# devices.  `classify.to_global` turns a host batch into a `jax.Array` split
# along that axis, which is how every training batch reaches the devices.

# %%
mesh = classify.make_mesh()
print(mesh)
images_host = np.zeros((BATCH_SIZE, 32, 32, 3), np.float32)
labels_host = np.zeros((BATCH_SIZE,), np.int32)
images_dev, labels_dev = classify.to_global((images_host, labels_host), mesh)
print("global batch", images_dev.shape, "->", len(images_dev.addressable_shards), "shards of",
      images_dev.addressable_shards[0].data.shape, "on", images_dev.sharding)

# %% [markdown]
# ## Training both networks
#
# The configs are the ones `python -m train.main` reads, with this notebook's
# sizes set on top and checked by the same validation.  Each run writes
# checkpoints to its workdir, so re-running the cell resumes an interrupted
# run, and a finished run is only read back.

# %%
results = {}
for model in MODELS:
  config = cifar.get_config(f"{model},{DATASET},{PRECISION}")
  config.num_epochs = NUM_EPOCHS
  config.quant.start_bits = START_BITS
  config.quant.epochs_per_step = EPOCHS_PER_STEP
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 4 * BATCH_SIZE
  config.data.max_train = MAX_TRAIN
  config.data.max_test = MAX_TEST
  config.data.val_fraction = VAL_FRACTION
  config.consistency.max_examples = CONSISTENCY_EXAMPLES
  validate.config(config)
  workdir = pathlib.Path(WORKDIR) / model
  results[model] = classify.train_and_evaluate(config, str(workdir))

# %%
for model, r in results.items():
  print(f"{model:16s} test {100 * r['test_acc']:.2f}%  clip-only {100 * r['consistency']['test_acc_clip_only']:.2f}%  "
        f"{r['images_per_second']:.0f} images/s on {len(devices)} {devices[0].device_kind}")
  display(Image(filename=str(pathlib.Path(WORKDIR) / model / "curves.png")))

# %% [markdown]
# ## Consistency report (Tables 4/5, Fig. 3)
#
# The same weights run with 4-bit and with clip-only activations; the table
# gives both accuracies and the MSE between every block's outputs, and the
# plot the normalised MSE per block.

# %%
report = consistency_report.report([str(pathlib.Path(WORKDIR) / m) for m in MODELS],
                                   str(pathlib.Path(WORKDIR) / "consistency"),
                                   max_examples=CONSISTENCY_EXAMPLES)
display(Image(filename=str(pathlib.Path(WORKDIR) / "consistency" / "layerwise_mse.png")))
