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
# # sparge-jax quickstart
#
# Trainable block-sparse attention ([SpargeAttention2](https://arxiv.org/abs/2602.13515)) in JAX. Attention
# runs on tiles of 128 queries x 64 keys; a cheap mask (mean-pooled q and k, then Top-k ∪ Top-p of each row)
# picks the few key tiles each query tile needs, and the kernels skip the rest, forward and backward.
#
# This notebook installs sparge-jax, checks the GPU, swaps `jax.nn.dot_product_attention` for
# `sparge_jax.attention.dot_product_attention` on a long video-like sequence and times both, shows block masks,
# trades error for speed, and puts sparse attention into a Flax NNX layer with `make_attention_fn`. Runtime: a
# GPU (Runtime > Change runtime type). A T4 runs the XLA kernels, an L4 or A100 the Triton kernels, an H100 the
# Mosaic GPU kernels; a CPU runtime falls back to small sizes and takes about 2 minutes.

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
# ## 2. The drop-in: sparse attention where `jax.nn.dot_product_attention` was
#
# `sparge_jax.attention.dot_product_attention` takes the arguments of `jax.nn.dot_product_attention` (shapes
# `[batch, seq, heads, head_dim]`, GQA, `is_causal`, sequence lengths, `return_residual`) plus the mask's
# settings: `topk` (the fraction of key tiles each query tile keeps) and `topp` (the attention mass kept).
#
# Random q and k make every key equally relevant, which no sparse method can exploit. Video transformers
# instead attend mostly to nearby tokens in space and time. `video_qkv` builds such inputs: tokens of a
# `frames x height x width` grid (flattened frame by frame, as Wan does), whose q and k are smooth functions of
# position, each head with its own reach. On an Ampere or newer GPU the sizes are those of Wan2.1-1.3B at 480p:
# 21 x 30 x 52 = 32,760 tokens, 12 heads of 128, bfloat16, against cuDNN's flash attention. A T4 has no cuDNN
# flash attention and XLA's dense attention holds all the logits in memory: 5 frames there (7,800 tokens). On
# CPU: 1,024 tokens, 2 heads of 32, float32.

# %%
import functools
import time

import matplotlib.pyplot as plt
import numpy as np

from sparge_jax.attention import block_mask, dot_product_attention

AMPERE = backends.on_ampere_or_newer()
if ON_GPU and not SMALL:
  GRID, HEADS, HEAD_DIM, DTYPE = ((21, 30, 52) if AMPERE else (5, 30, 52)), 12, 128, jnp.bfloat16
else:
  GRID, HEADS, HEAD_DIM, DTYPE = (4, 8, 32), 2, 32, jnp.float32
DENSE = "cudnn" if AMPERE else None  # jax.nn's implementation= for the dense reference: cuDNN or XLA
TOPK, TOPP = 0.03, 0.2  # the paper's setting for Wan2.1-1.3B


def video_qkv(key, grid, heads, head_dim, dtype=jnp.float32):
  """q, k, v: [1, frames * height * width, heads, head_dim] with local, per-head attention."""
  positions = np.stack(np.meshgrid(*map(np.arange, grid), indexing="ij"), -1).reshape(-1, 3)
  freq_key, q_key, k_key, v_key = jax.random.split(key, 4)
  reach = jnp.geomspace(0.3, 1.5, heads)[:, None, None]  # larger: sharper, more local attention
  freqs = reach * jax.random.normal(freq_key, (heads, 3, head_dim // 2))
  angles = jnp.einsum("sc,hcd->shd", jnp.asarray(positions, jnp.float32), freqs)
  # Unit-norm features; q.k / sqrt(head_dim) is then about 12 x (a Gaussian kernel of the distance).
  features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1) / np.sqrt(head_dim / 2)
  gain = np.sqrt(12.0 * np.sqrt(head_dim))
  q = gain * (features + 0.3 * jax.random.normal(q_key, features.shape) / np.sqrt(head_dim))
  k = gain * (features + 0.3 * jax.random.normal(k_key, features.shape) / np.sqrt(head_dim))
  v = jax.random.normal(v_key, features.shape)
  return tuple(x[None].astype(dtype) for x in (q, k, v))


def relative_l1(out, reference):
  """sum |out - reference| / sum |reference| in float32 (the paper's metric)."""
  out, reference = out.astype(jnp.float32), reference.astype(jnp.float32)
  return float(jnp.abs(out - reference).sum() / jnp.abs(reference).sum())


def benchmark(fn, *args, repeats=3 if SMALL else 20, **kwargs):
  """Median seconds per call of fn(*args, **kwargs), after a first call that compiles."""
  jax.block_until_ready(fn(*args, **kwargs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


dense = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=DENSE))
# The drop-in. topk and topp are traced arguments, so every setting below reuses one compilation.
sparse = jax.jit(dot_product_attention)
masks = jax.jit(block_mask)


def skipped(q, k, topk, topp):
  """The fraction of tiles the mask skips."""
  return 1.0 - float(masks(q, k, topk=topk, topp=topp).mean())


q, k, v = video_qkv(jax.random.key(0), GRID, HEADS, HEAD_DIM, DTYPE)
AUTO = backends.explain(q, k).chosen
print(f"q, k, v: {q.shape} {q.dtype}")
reference = dense(q, k, v)  # jax.nn.dot_product_attention(q, k, v)
out = sparse(q, k, v, topk=TOPK, topp=TOPP)  # sparge_jax.attention.dot_product_attention(q, k, v, topk=..., topp=...)
dense_s = benchmark(dense, q, k, v)
sparse_s = benchmark(sparse, q, k, v, topk=TOPK, topp=TOPP)
print(f"dense  ({DENSE or 'xla'}) {dense_s * 1e3:8.2f} ms")
print(
  f"sparse ({AUTO}) {sparse_s * 1e3:8.2f} ms (mask included): {dense_s / sparse_s:.1f}x, "
  f"{skipped(q, k, TOPK, TOPP):.1%} of tiles skipped, relative L1 error {relative_l1(out, reference):.4f}"
)

# %% [markdown]
# ## 3. Block masks
#
# `block_mask` returns, for each head, which key tiles (columns) each query tile (rows) keeps. Local attention
# shows as a diagonal band, with side bands for the same place in neighbouring frames; heads with a longer
# reach keep more tiles.

# %%
mask = np.asarray(masks(q, k, topk=TOPK, topp=TOPP))  # [batch, heads, query tiles, key tiles]
shown = list(range(min(4, HEADS)))
fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6), squeeze=False)
for ax, head in zip(axes[0], shown):
  ax.imshow(mask[0, head], cmap="Blues", interpolation="nearest", aspect="auto")
  ax.set_title(f"head {head}: keeps {mask[0, head].mean():.1%}")
  ax.set_xlabel("key tile")
axes[0, 0].set_ylabel("query tile")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Error and speed against sparsity
#
# Larger `topk` / `topp` keep more tiles: less error, less speed-up. The same settings on random q and k show
# why sparsity needs structured attention (and why the sparse model is fine-tuned; see `distill.ipynb`).

# %%
if SMALL:
  settings = [(0.01, 0.1), (0.1, 0.5), (0.3, 0.9)]
else:
  settings = [(0.01, 0.05), (0.02, 0.1), (0.03, 0.2), (0.05, 0.3), (0.1, 0.5), (0.2, 0.7), (0.4, 0.9)]
random_q, random_k = (jax.random.normal(key, q.shape, q.dtype) for key in jax.random.split(jax.random.key(1), 2))
random_reference = dense(random_q, random_k, v)
rows = []
for topk, topp in settings:
  rows.append(
    {
      "topk": topk,
      "topp": topp,
      "skipped": skipped(q, k, topk, topp),
      "error": relative_l1(sparse(q, k, v, topk=topk, topp=topp), reference),
      "random_error": relative_l1(sparse(random_q, random_k, v, topk=topk, topp=topp), random_reference),
      "speedup": dense_s / benchmark(sparse, q, k, v, topk=topk, topp=topp),
    }
  )
  print(
    "topk {topk:.2f} topp {topp:.2f}: {skipped:6.1%} skipped, error {error:.4f} "
    "(random q, k: {random_error:.3f}), {speedup:5.2f}x".format(**rows[-1])
  )

fraction = [row["skipped"] for row in rows]
fig, (ax_error, ax_speed) = plt.subplots(1, 2, figsize=(11, 3.8))
ax_error.plot(fraction, [row["error"] for row in rows], "o-", label="video-like q, k")
ax_error.plot(fraction, [row["random_error"] for row in rows], "s--", label="random q, k")
ax_error.set(xlabel="fraction of tiles skipped", ylabel="relative L1 error", yscale="log", title="error vs sparsity")
ax_error.legend()
ax_speed.plot(fraction, [row["speedup"] for row in rows], "o-")
ax_speed.axhline(1.0, color="gray", lw=0.8)
ax_speed.set(
  xlabel="fraction of tiles skipped",
  ylabel=f"dense ({DENSE or 'xla'}) time / sparse time",
  title=f"speed-up on {DEVICE.device_kind} ({AUTO} kernels)",
)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. In a Flax NNX layer
#
# `make_attention_fn(topk=..., topp=...)` returns a function with the signature `nnx.MultiHeadAttention` calls
# its `attention_fn` with. Below, a block of yours and a copy of it with sparse attention share the same
# weights: with `topk=1` every tile is kept and the two agree to rounding; at a real sparsity they differ, and,
# since the sparse attention is differentiable, a few optimizer steps that match the dense block's outputs (the
# idea of `distill.ipynb`) shrink the difference.

# %%
import optax
from flax import nnx

from sparge_jax.attention import make_attention_fn


class VideoBlock(nnx.Module):
  """A residual self-attention block; x: [batch, tokens, dim]."""

  def __init__(self, dim, heads, *, attention_fn=nnx.dot_product_attention, rngs):
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, dim, attention_fn=attention_fn, decode=False, rngs=rngs)

  def __call__(self, x):
    return x + self.attention(self.norm(x))


DIM, BLOCK_HEADS = 64, 2
# nnx.dot_product_attention materialises the full attention matrix: keep this grid modest.
BLOCK_GRID = (8, 16, 32) if ON_GPU and not SMALL else (4, 8, 32)
dense_block = VideoBlock(DIM, BLOCK_HEADS, rngs=nnx.Rngs(0))
# An untrained layer attends almost uniformly. Tie keys to queries so each token attends to tokens like itself,
# i.e. to its neighbours, as trained video models do.
tied = 2.0 * dense_block.attention.query.kernel[...]
dense_block.attention.query.kernel[...] = tied
dense_block.attention.key.kernel[...] = tied


def video_tokens(key, batch):
  """[batch, frames * height * width, DIM] tokens that vary smoothly over the video."""
  return jnp.concatenate([video_qkv(k, BLOCK_GRID, 1, DIM)[0][:, :, 0] for k in jax.random.split(key, batch)])


def attention_error(block, x):
  """Relative L1 error of the block's attention output (the residual removed) against the dense block."""
  return relative_l1(block(x) - x, dense_block(x) - x)


x_test = video_tokens(jax.random.key(100), 2)
all_tiles = nnx.clone(dense_block)
all_tiles.attention.attention_fn = make_attention_fn(topk=1.0, topp=1.0)
print(f"topk=1: max |sparse - dense| = {float(jnp.abs(all_tiles(x_test) - dense_block(x_test)).max()):.2e}")

sparse_block = nnx.clone(dense_block)  # same weights, new Variables: training it leaves dense_block alone
sparse_block.attention.attention_fn = make_attention_fn(topk=0.05, topp=0.3)
print(f"topk=0.05, topp=0.3: attention error {attention_error(sparse_block, x_test):.4f} before fine-tuning")

optimizer = nnx.Optimizer(sparse_block, optax.adam(3e-3), wrt=nnx.Param)


@nnx.jit
def train_step(sparse_block, optimizer, dense_block, x):
  target = dense_block(x)

  def loss_fn(block):
    return jnp.mean(jnp.square(block(x) - target))

  loss, grads = nnx.value_and_grad(loss_fn)(sparse_block)
  optimizer.update(sparse_block, grads)
  return loss


steps = 5 if SMALL else 200
losses = [
  float(train_step(sparse_block, optimizer, dense_block, video_tokens(jax.random.key(step), 4)))
  for step in range(steps)
]
print(
  f"{steps} steps: loss {losses[0]:.4g} -> {losses[-1]:.4g}; "
  f"attention error {attention_error(sparse_block, x_test):.4f} after"
)

# %% [markdown]
# Next: `distill.ipynb` fine-tunes a whole sparse video transformer against its dense teacher. For the Wan2.1
# model, `sparge_jax.models.wan.WanModel` takes `AttentionConfig(kind="sparse", topk=..., topp=...)` and
# `load_diffusers` reads diffusers checkpoints.
