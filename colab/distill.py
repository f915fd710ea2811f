# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Distilling a sparse student from a dense teacher
#
# SpargeAttention2 keeps only a few percent of the attention tiles. Switched on in a trained model without
# further training, that loses quality; a short fine-tune recovers it. The student (sparse self-attention)
# starts as a copy of the teacher (dense attention) and learns to predict the teacher's velocity on the same
# noisy input, time and text: L = |u_student - u_teacher|^2.
#
# This notebook runs the trainer (`sparge-distill`, or `python -m train.distill` in a checkout) on its toy
# preset: a 2-layer Wan2.1 transformer and synthetic videos of moving shapes. It first pretrains the dense
# teacher for a few hundred steps, then distills the sparse student for a few hundred more, with progress bars
# and live loss curves; TensorBoard shows the logged metrics. At the end both models sample videos from the same
# noise and captions, shown side by side. The same trainer runs the real recipe on Wan2.1-1.3B and 14B
# (`--config wan2_1_1_3b`). Runtime: a GPU (Runtime > Change runtime type), a few minutes; a CPU runtime runs
# half the steps, in about 2 minutes on 2 cores.

# %%
# Setup: installs sparge-jax with the JAX wheels this runtime's NVIDIA driver supports, unless it is already
# importable. Run first; edit REPO_URL for a fork.
import importlib
import importlib.metadata
import os
import subprocess
import sys
import tomllib

REPO_URL = "https://github.com/sparge-jax/sparge-jax"
SMALL = os.environ.get("SPARGE_COLAB_SMALL") == "1"  # tiny sizes: CI runs the notebooks this way


def install_extras(driver_version):
  """sparge-jax's extras for an NVIDIA driver version such as "550.54.15" (None: no GPU): the trainer's, and the
  JAX CUDA wheels that driver runs (CUDA 13 from driver 580, CUDA 12 from 525.60.13, none before)."""
  try:
    version = tuple(int(part) for part in driver_version.strip().split("."))
  except (AttributeError, ValueError):  # no GPU, or not a version
    version = ()
  if version >= (580,):
    return "train,cuda13"
  if version >= (525, 60, 13):
    return "train,cuda12"
  return "train"


def pip_arguments(extras, checkout):
  """What pip installs: the checkout's working tree (editable) if there is one, else the repository."""
  return ["-e", f"{checkout}[{extras}]"] if checkout else [f"sparge-jax[{extras}] @ git+{REPO_URL}"]


def nvidia_driver():
  """The driver version nvidia-smi reports for the first GPU, or None."""
  try:
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.SubprocessError):
    return None
  lines = result.stdout.split()
  return lines[0] if result.returncode == 0 and lines else None


def sparge_checkout(directory):
  """directory, absolute, if it is a sparge-jax checkout (its pyproject.toml names the project), else None."""
  try:
    with open(os.path.join(directory, "pyproject.toml"), "rb") as f:
      name = tomllib.load(f).get("project", {}).get("name")
  except (OSError, tomllib.TOMLDecodeError):
    return None
  return os.path.abspath(directory) if name == "sparge-jax" else None


DRIVER = nvidia_driver()
try:
  import sparge_jax
except ImportError:
  checkout = sparge_checkout(os.pardir)  # the working directory is a checkout's colab/ folder
  target = pip_arguments(install_extras(DRIVER), checkout)
  print("pip install", *target)
  loaded = {name: sys.modules[name].__version__ for name in ("numpy", "jax") if name in sys.modules}
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", *target], check=True)
  replaced = [name for name, version in loaded.items() if importlib.metadata.version(name) != version]
  if replaced:
    raise RuntimeError(
      f"pip replaced {replaced}, which this runtime had already imported: restart it "
      "(Runtime > Restart session) and run all cells again; the install is skipped then."
    ) from None
  if checkout:
    sys.path.insert(0, checkout)  # a running kernel sees an editable install only after a restart
  importlib.invalidate_caches()
  import sparge_jax
# A checkout's trainer is its package train/ (python -m train.distill); an installed one is sparge_jax.train.
CHECKOUT = sparge_checkout(os.path.dirname(os.path.dirname(sparge_jax.__file__)))
if CHECKOUT:
  sys.path.insert(0, CHECKOUT)
print("sparge_jax", sparge_jax.__version__, "from", os.path.dirname(sparge_jax.__file__))

# %% [markdown]
# ## 1. Runtime
#
# The GPU, its compute capability, and the attention kernels that `implementation=None` (auto) picks there for a
# Wan2.1 layer, with the reasons the others do not apply.

# %%
import jax
import jax.numpy as jnp

from sparge_jax import backends

DEVICE = jax.devices()[0]
ON_GPU = DEVICE.platform == "gpu"
if ON_GPU:
  print(f"GPU: {DEVICE.device_kind}, compute capability {DEVICE.compute_capability}, NVIDIA driver {DRIVER}")
else:
  print(f"No GPU: JAX {jax.__version__} runs on the CPU, at small sizes; timings there say little about a GPU.")
  if DRIVER:
    print(
      f"nvidia-smi sees a GPU (driver {DRIVER}) that JAX does not: JAX's CUDA 12 wheels need a driver "
      ">= 525.60.13, its CUDA 13 wheels >= 580."
    )
wan_layer = jax.ShapeDtypeStruct((1, 32760, 12, 128), jnp.bfloat16)  # Wan2.1-1.3B at 480p: [batch, seq, heads, dim]
print(backends.explain(wan_layer, wan_layer))

# %% [markdown]
# ## 2. The run
#
# `configs.tiny()` is the trainer's toy preset: the model, the sparse attention of the student (Top-k 10% ∪
# Top-p 30% of 32 x 16 tiles), the teacher's pretraining and the optimizer. Change fields with
# `dataclasses.replace`, as the command line's `--config.FIELD=VALUE` does.

# %%
import dataclasses
import json
import threading

import matplotlib.pyplot as plt
from IPython.display import Image, display
from tqdm import tqdm

if CHECKOUT:
  from train import configs, distill, sample, teacher
else:
  from sparge_jax.train import configs, distill, sample, teacher

config = configs.tiny()
if SMALL:
  config = dataclasses.replace(
    config,
    steps=3,
    batch_size=2,
    checkpoint_every=3,
    warmup_steps=0,
    pretrain_teacher=dataclasses.replace(config.pretrain_teacher, steps=3),
    data=dataclasses.replace(config.data, frames=4, height=8, width=16, synthetic_examples=8),
  )
elif not ON_GPU:  # half the steps: about 2 minutes on 2 CPU cores
  config = dataclasses.replace(
    config, steps=100, pretrain_teacher=dataclasses.replace(config.pretrain_teacher, steps=150)
  )
configs.validate(config)
WORKDIR = distill.default_workdir(config)  # a new folder per run; the same one again would resume
print("trainer from", os.path.dirname(distill.__file__))
print(
  f"model: {config.model.num_layers} layers, {config.model.num_attention_heads} heads of "
  f"{config.model.attention_head_dim}; videos: {config.data.frames} x {config.data.height} x {config.data.width} "
  f"latents; student attention: {config.attention}"
)
print(f"teacher pretraining: {config.pretrain_teacher.steps} steps; distillation: {config.steps} steps")
print(f"workdir: {WORKDIR}")

# %% [markdown]
# ## 3. Train
#
# `distill.run` runs both phases and logs every step to `metrics.jsonl` (the teacher's phase under `teacher/`)
# and to TensorBoard. A helper thread reads those files to draw the progress bars and the loss curves while
# training runs here.

# %%
PHASES = [  # (name, metrics file, steps)
  (
    "teacher pretraining (diffusion loss)",
    os.path.join(teacher.pretrained_dir(WORKDIR), "metrics.jsonl"),
    config.pretrain_teacher.steps,
  ),
  ("student distillation (distill loss)", os.path.join(WORKDIR, "metrics.jsonl"), config.steps),
]


def logged_losses(path):
  """{step: training loss} logged so far (eval records, which carry no "loss", are skipped)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    records = [json.loads(line) for line in f if line.endswith("\n")]  # skip a half-written line
  return {record["step"]: record["loss"] for record in records if "loss" in record}


figure, axes = plt.subplots(1, len(PHASES), figsize=(11, 3.5))
plt.close(figure)  # shown through the display handle below, not again at the end of the cell
plot = display(figure, display_id=True)
bars = {}  # one progress bar per phase, opened at its first step: the phases run one after the other


def refresh():
  """Advances the bars and redraws the curves of the phases with new steps."""
  changed = False
  for ax, (name, path, steps) in zip(axes, PHASES):
    losses = logged_losses(path)
    bar = bars.get(name)
    if not losses or (bar is not None and bar.n == len(losses)):
      continue
    if bar is None:
      bar = bars[name] = tqdm(total=steps, desc=name.split(" (")[0], unit="step", file=sys.stdout)
    bar.update(len(losses) - bar.n)
    if bar.n >= steps:
      bar.close()
    ax.clear()
    ax.plot(list(losses), list(losses.values()))
    ax.set(title=name, xlabel="step", ylabel="loss", yscale="log")
    changed = True
  if changed:  # drawing takes time from training: only when there is something new
    figure.tight_layout()
    plot.update(figure)


stop = threading.Event()


def watch():
  while not stop.wait(1.0):
    refresh()


monitor = threading.Thread(target=watch, daemon=True)
monitor.start()
try:
  summary = distill.run(config, WORKDIR, progress=False)
finally:
  stop.set()
  monitor.join()
  refresh()
  for bar in bars.values():
    bar.close()
distill.print_summary(summary)

# %% [markdown]
# ## 4. TensorBoard
#
# The run's TensorBoard events (loss, gradient norm, learning rate, sparsity per layer) are in the workdir; the
# teacher's pretraining is under `teacher/`. On Colab the TensorBoard extension shows them inline; elsewhere run
# the printed command (in this notebook with `%tensorboard`, or in a shell without the `%`).

# %%
# %load_ext tensorboard
from IPython import get_ipython

if "google.colab" in sys.modules:
  get_ipython().run_line_magic("tensorboard", f"--logdir {WORKDIR}")
else:
  print(f"%tensorboard --logdir {WORKDIR}")

# %% [markdown]
# ## 5. Sample both and compare
#
# `sample.sample_pair` integrates the flow with Euler steps (Wan's shift 5) for the teacher and the student from
# the same noise and captions, and `sample.write_gif` renders them side by side: one row per video, teacher |
# student | 4 x |difference|. Latents have 4 channels; they are shown through a fixed 3-colour projection, not a
# VAE. A 2-layer toy teacher trained for minutes draws no clean shapes; what this shows is how closely the sparse
# student follows its teacher.

# %%
import imageio.v3 as iio

SAMPLES, SAMPLE_STEPS = (2, 3) if SMALL else (4, 30) if ON_GPU else (2, 20)
teacher_videos, student_videos, teacher_source = sample.sample_pair(
  config, WORKDIR, num_videos=SAMPLES, num_steps=SAMPLE_STEPS, shift=5.0, seed=0
)
print(f"{SAMPLES} videos of {teacher_videos.shape[1:]} latents, {SAMPLE_STEPS} Euler steps")
print(f"PSNR of the student's samples against the teacher's: {sample.psnr(teacher_videos, student_videos):.2f} dB")
GIF = os.path.join(WORKDIR, "samples.gif")
sample.write_gif(GIF, teacher_videos, student_videos, scale=8)
display(Image(filename=GIF))

# %%
# The first video as a frame strip, cut out of the GIF: [frames, videos * height, 3 * width, 3].
gif_frames = iio.imread(GIF)
height, width = gif_frames.shape[1] // SAMPLES, gif_frames.shape[2] // 3
panels = ["dense teacher", "sparse student", "4 x |difference|"]
fig, axes = plt.subplots(
  len(panels),
  len(gif_frames),
  squeeze=False,
  figsize=(1.5 + 1.2 * len(gif_frames), 0.5 + 1.2 * len(panels) * height / width),
)
for row, name in enumerate(panels):
  for frame, ax in enumerate(axes[row]):
    ax.imshow(gif_frames[frame, :height, row * width : (row + 1) * width])
    ax.set_xticks([])
    ax.set_yticks([])
    if frame == 0:
      ax.set_ylabel(name, rotation=0, ha="right", va="center")
    if row == 0:
      ax.set_title(f"frame {frame}")
fig.tight_layout()
plt.show()
