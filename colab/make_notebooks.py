"""Writes colab/quickstart.ipynb and colab/distill.ipynb (outputs cleared) from the cells below.

    python colab/make_notebooks.py

Edit the cells here, not in the .ipynb files: tests/test_notebooks.py checks the two agree.
"""

from __future__ import annotations

import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """\
# Setup (run first): edit REPO_URL if you use a fork. On Colab pick a GPU first (Runtime > Change runtime type).
import importlib.metadata
import os
import subprocess
import sys

REPO_URL = "https://github.com/sparge-jax/sparge-jax"
SMALL = os.environ.get("SPARGE_COLAB_SMALL") == "1"  # tiny sizes: the CPU tests run the notebooks this way

try:
    import sparge_jax  # already installed: nothing to do
except ImportError:
    repo_dir = os.path.abspath("sparge-jax")
    if not os.path.isdir(repo_dir):
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, repo_dir], check=True)
    imported = {name: sys.modules[name].__version__ for name in ("numpy", "jax") if name in sys.modules}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{repo_dir}[cuda]"], check=True)
    # A running kernel sees an editable install only after a restart; until then import from the clone.
    sys.path.insert(0, repo_dir)
    replaced = [name for name, version in imported.items() if importlib.metadata.version(name) != version]
    if replaced:
        raise RuntimeError(f"pip replaced {replaced}, which this runtime had already imported: restart it "
                           "(Runtime > Restart session) and run all cells again; the install is skipped then.")
    import sparge_jax
print("sparge_jax", sparge_jax.__version__, "from", os.path.dirname(sparge_jax.__file__))"""

DEVICES = """\
import shutil

import jax

print("JAX", jax.__version__, "devices:", jax.devices())
ON_GPU = jax.default_backend() == "gpu"
if not ON_GPU:
    print("No GPU found: running on CPU, where timings say little about GPU speed.")
    if shutil.which("nvidia-smi"):
        print("nvidia-smi sees a GPU that JAX does not. The `cuda` extra installs CUDA 13 wheels, which need an "
              "NVIDIA driver >= 580 (see `nvidia-smi`); with an older driver install jax[cuda12]==0.11.2 instead.")"""

QUICKSTART = [
  ("code", SETUP),
  (
    "markdown",
    """\
# sparge-jax quickstart

Trainable block-sparse attention ([SpargeAttention2](https://arxiv.org/abs/2602.13515)) in JAX. Attention
runs on tiles of 128 queries x 64 keys; a cheap mask (mean-pooled q and k, then Top-k ∪ Top-p of each row)
picks the few key tiles each query tile needs, and the kernels skip the rest, forward and backward.

This notebook: install, check the GPU, compare `sparse_attention` with `dense_attention` on a long
sequence, look at block masks, trade error for speed, and drop sparse attention into your own Flax NNX
layer. Runtime: a GPU (Runtime > Change runtime type); on a CPU runtime it falls back to small sizes
and takes about 2 minutes.""",
  ),
  ("markdown", "## 1. Devices"),
  ("code", DEVICES),
  (
    "markdown",
    """\
## 2. Sparse vs dense on a long sequence

Random q and k make every key equally relevant, which no sparse method can exploit. Video transformers
instead attend mostly to nearby tokens in space and time. `video_qkv` builds such inputs: tokens of a
`frames x height x width` grid (flattened frame by frame, as Wan does), whose q and k are smooth
functions of position, each head with its own reach. On a GPU the sizes are those of Wan2.1-1.3B at 480p:
21 x 30 x 52 = 32,760 tokens, 12 heads of 128, bfloat16; on CPU 1,024 tokens, 2 heads of 32, float32.""",
  ),
  (
    "code",
    '''\
import functools
import time

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from sparge_jax.attention import block_mask, dense_attention, sparse_attention

if ON_GPU and not SMALL:
    GRID, HEADS, HEAD_DIM, DTYPE = (21, 30, 52), 12, 128, jnp.bfloat16
else:
    GRID, HEADS, HEAD_DIM, DTYPE = (4, 8, 32), 2, 32, jnp.float32  # 1,024 tokens
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


q, k, v = video_qkv(jax.random.key(0), GRID, HEADS, HEAD_DIM, DTYPE)
print(f"q, k, v: {q.shape} {q.dtype}")
dense = jax.jit(dense_attention)
# topk and topp are traced arguments, so every setting below reuses one compilation.
sparse = jax.jit(functools.partial(sparse_attention, return_stats=True))

reference = dense(q, k, v)
out, stats = sparse(q, k, v, topk=TOPK, topp=TOPP)
dense_s = benchmark(dense, q, k, v)
sparse_s = benchmark(sparse, q, k, v, topk=TOPK, topp=TOPP)
print(f"dense  {dense_s * 1e3:8.2f} ms")
print(f"sparse {sparse_s * 1e3:8.2f} ms  (mask included): {dense_s / sparse_s:.1f}x, "
      f"{float(stats['sparsity'].mean()):.1%} of tiles skipped, relative L1 error {relative_l1(out, reference):.4f}")
print("skipped per head:", np.round(np.asarray(stats["sparsity"][0]), 3))''',
  ),
  (
    "markdown",
    """\
## 3. Block masks

`block_mask` returns, for each head, which key tiles (columns) each query tile (rows) keeps. Local
attention shows as a diagonal band, with side bands for the same place in neighbouring frames; heads
with a longer reach keep more tiles.""",
  ),
  (
    "code",
    """\
mask = np.asarray(block_mask(q, k, topk=TOPK, topp=TOPP))  # [batch, heads, query tiles, key tiles]
shown = list(range(min(4, HEADS)))
fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.6), squeeze=False)
for ax, head in zip(axes[0], shown):
    ax.imshow(mask[0, head], cmap="Blues", interpolation="nearest", aspect="auto")
    ax.set_title(f"head {head}: keeps {mask[0, head].mean():.1%}")
    ax.set_xlabel("key tile")
axes[0, 0].set_ylabel("query tile")
fig.tight_layout()
plt.show()""",
  ),
  (
    "markdown",
    """\
## 4. Error and speed against sparsity

Larger `topk` / `topp` keep more tiles: less error, less speed-up. The same settings on random q and k
show why sparsity needs structured attention (and why the sparse model is fine-tuned; see
`distill.ipynb`). On a GPU the Triton kernels run; on CPU a gather-based XLA path, whose timings say
little about GPU speed.""",
  ),
  (
    "code",
    """\
settings = [(0.01, 0.1), (0.03, 0.2), (0.1, 0.5), (0.3, 0.9)] if SMALL else [
    (0.01, 0.05), (0.02, 0.1), (0.03, 0.2), (0.05, 0.3), (0.1, 0.5), (0.2, 0.7), (0.4, 0.9)]
random_q, random_k = (jax.random.normal(key, q.shape, q.dtype) for key in jax.random.split(jax.random.key(1), 2))
random_reference = dense(random_q, random_k, v)
rows = []
for topk, topp in settings:
    out, stats = sparse(q, k, v, topk=topk, topp=topp)
    random_out, _ = sparse(random_q, random_k, v, topk=topk, topp=topp)
    rows.append(dict(topk=topk, topp=topp, sparsity=float(stats["sparsity"].mean()),
                     error=relative_l1(out, reference), random_error=relative_l1(random_out, random_reference),
                     speedup=dense_s / benchmark(sparse, q, k, v, topk=topk, topp=topp)))
    print("topk {topk:.2f} topp {topp:.2f}: {sparsity:6.1%} skipped, error {error:.4f} "
          "(random q, k: {random_error:.3f}), {speedup:5.2f}x".format(**rows[-1]))

sparsity = [r["sparsity"] for r in rows]
fig, (ax_error, ax_speed) = plt.subplots(1, 2, figsize=(11, 3.8))
ax_error.plot(sparsity, [r["error"] for r in rows], "o-", label="video-like q, k")
ax_error.plot(sparsity, [r["random_error"] for r in rows], "s--", label="random q, k")
ax_error.set(xlabel="fraction of tiles skipped", ylabel="relative L1 error", yscale="log",
             title="error vs sparsity")
ax_error.legend()
ax_speed.plot(sparsity, [r["speedup"] for r in rows], "o-")
ax_speed.axhline(1.0, color="gray", lw=0.8)
ax_speed.set(xlabel="fraction of tiles skipped", ylabel="dense time / sparse time",
             title=f"speed-up on {jax.devices()[0].device_kind}")
fig.tight_layout()
plt.show()""",
  ),
  (
    "markdown",
    """\
## 5. In your own Flax NNX layer

`sparse_attention` takes `[batch, seq, heads, head_dim]` arrays like `jax.nn.dot_product_attention` and
`nnx.dot_product_attention`, so it drops into `nnx.MultiHeadAttention` through `attention_fn` (or into any
layer of yours that calls an attention function). Masks, causal attention and dropout are not supported.

Below, a user's block and a copy of it with sparse attention share the same weights: with `topk=1.0`
every tile is kept and the two agree to rounding; at a real sparsity they differ, and, since the sparse
attention is differentiable, a few optimizer steps that match the dense block's outputs (the idea of
`distill.ipynb`) shrink the difference.""",
  ),
  (
    "code",
    '''\
import optax
from flax import nnx


class VideoBlock(nnx.Module):
    """A residual self-attention block; x: [batch, tokens, dim]."""

    def __init__(self, dim, heads, *, attention_fn=nnx.dot_product_attention, rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(heads, dim, attention_fn=attention_fn, decode=False, rngs=rngs)

    def __call__(self, x):
        return x + self.attention(self.norm(x))


def sparge_attention_fn(query, key, value, *, mask=None, dropout_rate=0.0, is_causal=False,
                        topk=0.03, topp=0.2, **unused):
    """nnx.MultiHeadAttention's attention_fn interface on top of sparse_attention."""
    if mask is not None or is_causal or dropout_rate > 0:
        raise ValueError("sparse_attention has no attention mask, causal mode or dropout")
    return sparse_attention(query, key, value, topk=topk, topp=topp)


DIM, BLOCK_HEADS = 64, 2
# nnx.dot_product_attention materialises the full attention matrix: keep this grid modest.
BLOCK_GRID = (8, 16, 32) if ON_GPU and not SMALL else (4, 8, 32)
dense_block = VideoBlock(DIM, BLOCK_HEADS, rngs=nnx.Rngs(0))
# An untrained layer attends almost uniformly. Tie keys to queries so each token attends to tokens like
# itself, i.e. to its neighbours, as trained video models do.
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
all_tiles.attention.attention_fn = functools.partial(sparge_attention_fn, topk=1.0, topp=1.0)
print(f"topk=1: max |sparse - dense| = {float(jnp.abs(all_tiles(x_test) - dense_block(x_test)).max()):.2e}")

sparse_block = nnx.clone(dense_block)  # same weights, new Variables: training it leaves dense_block alone
sparse_block.attention.attention_fn = functools.partial(sparge_attention_fn, topk=0.05, topp=0.3)
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
losses = [float(train_step(sparse_block, optimizer, dense_block, video_tokens(jax.random.key(step), 4)))
          for step in range(steps)]
print(f"{steps} steps: loss {np.mean(losses[:5]):.4g} -> {np.mean(losses[-5:]):.4g}; "
      f"attention error {attention_error(sparse_block, x_test):.4f} after")''',
  ),
  (
    "markdown",
    """\
Next: `distill.ipynb` fine-tunes a whole sparse video transformer against its dense teacher. For the
Wan2.1 model, `sparge_jax.models.wan.WanModel` takes `AttentionConfig(kind="sparse", topk=..., topp=...)`
and `load_diffusers` reads diffusers checkpoints.""",
  ),
]

DISTILL = [
  ("code", SETUP),
  (
    "markdown",
    """\
# Distilling a sparse student from a dense teacher

SpargeAttention2 keeps only a few percent of the attention tiles. Switched on in a trained model without
further training, that loses quality; a short fine-tune recovers it. The student (sparse self-attention)
starts as a copy of the teacher (dense attention) and learns to predict the teacher's velocity on the
same noisy input, time and text: L = |u_student - u_teacher|^2.

Here the model is a 2-layer toy Wan2.1 transformer and the data are synthetic videos of moving shapes,
so everything runs in minutes: the trainer (`train.distill`) first pretrains the dense teacher on the
videos for a few hundred steps, then distills the sparse student for a few hundred more. At the end
both sample videos from the same noise and captions. The same trainer runs the real recipe on
Wan2.1-1.3B/14B (`python -m train.distill --config wan2_1_1_3b`). Runtime: a GPU (Runtime > Change
runtime type); a CPU runtime also works, in about 5 minutes on 2 cores.""",
  ),
  ("code", DEVICES),
  (
    "markdown",
    """\
## 1. The run

`train.configs.tiny()` is the trainer's toy preset: the model, the sparse attention of the student
(Top-k 10% ∪ Top-p 30% of 32 x 16 tiles), the teacher's pretraining and the optimizer. Change fields
with `dataclasses.replace`.""",
  ),
  (
    "code",
    """\
import dataclasses
import json
import threading

import matplotlib.pyplot as plt
from IPython.display import Image, display
from tqdm.auto import tqdm

from train import configs, distill, models

config = configs.tiny()
if SMALL:
    config = dataclasses.replace(
        config, steps=3, batch_size=2, checkpoint_every=3, warmup_steps=0,
        pretrain_teacher=dataclasses.replace(config.pretrain_teacher, steps=3),
        data=dataclasses.replace(config.data, frames=4, height=8, width=16, synthetic_examples=8))
configs.validate(config)
WORKDIR = distill.default_workdir(config)  # a new directory per run; the same one would resume
teacher_config, student_config = models.model_configs(config)
print(f"model: {config.model.num_layers} layers, {config.model.num_attention_heads} heads of "
      f"{config.model.attention_head_dim}; videos: {config.data.frames} x {config.data.height} x "
      f"{config.data.width} latents; student attention: {student_config.attention}")
print(f"teacher pretraining: {config.pretrain_teacher.steps} steps; distillation: {config.steps} steps; "
      f"workdir: {WORKDIR}")""",
  ),
  (
    "markdown",
    """\
## 2. Train

`distill.run` runs both phases and logs every step to `metrics.jsonl` (the teacher's phase under
`teacher/`). A helper thread reads those files to draw the progress bars and the loss curves while
training runs here.""",
  ),
  (
    "code",
    '''\
PHASES = [  # (name, metrics file, steps)
    ("teacher pretraining (diffusion loss)", os.path.join(WORKDIR, "teacher", "metrics.jsonl"),
     config.pretrain_teacher.steps),
    ("student distillation (distill loss)", os.path.join(WORKDIR, "metrics.jsonl"), config.steps),
]


def logged_losses(path):
    """{step: loss} logged so far; a resumed run logs steps again, the last record wins."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.endswith("\\n")]  # skip a half-written line
    return {r["step"]: r["loss"] for r in records}


figure, axes = plt.subplots(1, len(PHASES), figsize=(11, 3.5))
plt.close(figure)  # shown through the display handle below, not again at the end of the cell
plot = display(figure, display_id=True)
bars = [tqdm(total=steps, desc=name.split(" (")[0], unit="step") for name, _, steps in PHASES]


def refresh():
    """Redraws the curves when there are new steps (drawing takes CPU time from training)."""
    losses_per_phase = [logged_losses(path) for _, path, _ in PHASES]
    if [len(losses) for losses in losses_per_phase] == [bar.n for bar in bars]:
        return
    for ax, bar, losses, (name, _, _) in zip(axes, bars, losses_per_phase, PHASES):
        bar.update(len(losses) - bar.n)
        ax.clear()
        ax.plot(list(losses), list(losses.values()))
        ax.set(title=name, xlabel="step", ylabel="loss", yscale="log")
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
    for bar in bars:
        bar.close()
distill.print_summary(summary)''',
  ),
  (
    "markdown",
    """\
## 3. Sample both and compare

`train.sample` integrates the flow with Euler steps (Wan's shift 5) for the teacher and the student from
the same noise and captions, and renders them side by side: one row per video, teacher | student |
4 x |difference|. Latents have 4 channels; they are shown through a fixed 3-colour projection, not a VAE.
A 2-layer toy teacher trained for minutes draws no clean shapes; what this shows is how closely the
sparse student follows its teacher.""",
  ),
  (
    "code",
    """\
import imageio.v3 as iio

from train import sample

SAMPLES, SAMPLE_STEPS = (2, 3) if SMALL else (4, 30)
teacher_videos, student_videos, teacher_source = sample.sample_pair(
    config, WORKDIR, num_videos=SAMPLES, num_steps=SAMPLE_STEPS, shift=5.0, seed=0)
print(f"{SAMPLES} videos of {teacher_videos.shape[1:]} latents, {SAMPLE_STEPS} Euler steps")
print(f"PSNR of the student's samples against the teacher's: {sample.psnr(teacher_videos, student_videos):.2f} dB")
GIF = os.path.join(WORKDIR, "samples.gif")
sample.write_gif(GIF, teacher_videos, student_videos, scale=8)
display(Image(filename=GIF))""",
  ),
  (
    "code",
    """\
# The first video as a frame strip, cut out of the GIF: [frames, videos * height, 3 * width, 3].
gif_frames = iio.imread(GIF)
height, width = gif_frames.shape[1] // SAMPLES, gif_frames.shape[2] // 3
panels = ["dense teacher", "sparse student", "4 x |difference|"]
fig, axes = plt.subplots(len(panels), len(gif_frames), squeeze=False,
                         figsize=(1.5 + 1.2 * len(gif_frames), 0.5 + 1.2 * len(panels) * height / width))
for row, name in enumerate(panels):
    for frame, ax in enumerate(axes[row]):
        ax.imshow(gif_frames[frame, :height, row * width:(row + 1) * width])
        ax.set_xticks([]), ax.set_yticks([])
        if frame == 0:
            ax.set_ylabel(name, rotation=0, ha="right", va="center")
        if row == 0:
            ax.set_title(f"frame {frame}")
fig.tight_layout()
plt.show()""",
  ),
]


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.cells = [
    nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
    for kind, text in cells
  ]
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i}"  # stable ids keep regenerated files identical
  nb.metadata = {
    "accelerator": "GPU",
    "colab": {"provenance": [], "gpuType": "L4"},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
  }
  return nb


NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "distill.ipynb": DISTILL}


def main() -> None:
  for name, cells in NOTEBOOKS.items():
    path = os.path.join(HERE, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      nbformat.write(notebook(cells), f)
    os.replace(tmp, path)
    print("wrote", path)


if __name__ == "__main__":
  main()
