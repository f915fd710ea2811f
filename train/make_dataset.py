"""Write a latent-video dataset in the shard format of ``train.data``.

    python -m train.make_dataset --config wan2_1_1_3b --videos clips/ --captions captions.jsonl \\
        --model Wan2.1-T2V-1.3B-Diffusers --out data/wan_latents                       # real videos
    python -m train.make_dataset --out data/shapes --num_examples 512                  # synthetic
    python -m train.make_dataset --out data/teacher --source teacher --config.teacher=PATH \\
        --num_examples 256 --num_steps 30                                               # teacher samples
    python -m train.make_dataset --out data/more --source teacher --config runs/RUN/config.json

(``sparge-make-dataset`` once installed.) ``videos``: each video of ``--videos`` with its caption becomes one
example: the clip (``train.videos``: ``1 + 4 (frames - 1)`` frames at ``--fps``, centre-cropped and resized to
8x the latent size) through the VAE of ``--model`` to normalised latents, the caption through its UMT5 text
encoder. A video that cannot be decoded, is too short or has no caption is skipped and listed with the
reason in ``<out>/report.json``. Work goes to ``<out>.partial/`` clip by clip, so a rerun of the same command
continues where it stopped; each process of a multi-process run takes every n-th video. The same videos and
settings on the same devices give byte-identical shards.

``synthetic``: procedural moving shapes with matching captions (``train.data.MovingShapes``) at the latent size
``--config.frames/height/width``, with the model's channels and text width. ``teacher``: the published recipes
fine-tune on teacher-generated latents; this integrates the dense teacher (``--config.teacher``) with the Euler
sampler from seeded noise, conditioned on the captions of ``--config.captions`` if set, else on the synthetic
captions. ``--config`` starts from a trainer preset or a run's ``config.json`` (its model, teacher and data
sizes).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from sparge_jax.config import AttentionConfig
from sparge_jax.files import write_bytes_atomic, write_json_atomic
from sparge_jax.models import umt5, wan_vae
from sparge_jax.models.umt5 import UMT5Config
from sparge_jax.models.wan_vae import WanVAEConfig

from . import cli, distill, errors, flow, sharding, sources, videos
from .configs import PRESETS, Config, ModelConfig, checker, patch_grid, validate_model
from .data import MovingShapes, Source, write_dataset
from .models import abstract_model
from .teacher import load_teacher
from .workdir import check_new_directory


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What the dataset is made for: a model, its teacher, and the latent and text sizes."""

  model: ModelConfig
  """The architecture (its channels and text width set the shapes; the teacher must match it)."""
  teacher: str = "random"
  """With --source teacher: a diffusers Wan transformer folder or a workdir of ours ("random": untrained)."""
  captions: str = ""
  """With --source teacher: a shard folder whose captions condition the samples; empty: synthetic captions."""
  frames: int = 8
  """Latent frames per video."""
  height: int = 16
  """Latent height."""
  width: int = 16
  """Latent width."""
  text_len: int = 16
  """Text tokens of the synthetic captions."""
  batch_size: int = 8
  """Teacher samples computed at once."""
  compute_dtype: Literal["float32", "bfloat16"] = "float32"
  """The teacher's compute dtype."""
  seed: int = 0
  """Seeds the synthetic videos and captions, and the teacher's noise."""

  @classmethod
  def from_config(cls, config: Config) -> DatasetConfig:
    """The dataset fields of a trainer config (the teacher a run pretrains is not known here: random)."""
    d = config.data
    return cls(
      model=config.model,
      teacher=config.teacher,
      captions=d.path,
      frames=d.frames,
      height=d.height,
      width=d.width,
      text_len=d.text_len,
      batch_size=config.batch_size,
      compute_dtype=config.compute_dtype,
      seed=config.seed,
    )

  def teacher_model(self):
    return self.model.wan(attention=AttentionConfig(kind="dense"), compute_dtype=self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class Args:
  """The command line of ``train.make_dataset``."""

  config: DatasetConfig
  out: str
  """The dataset folder to create (it must not exist)."""
  source: Literal["synthetic", "teacher", "videos"] | None = None
  """synthetic: moving shapes; teacher: the teacher's samples for the captions; videos: encode --videos
  (the default with --videos, else synthetic)."""
  videos: str = ""
  """A folder of videos (mp4, webm, mov, mkv, avi, gif; a sub-folder of png/jpg frames is one video), or a text
  file listing one per line."""
  captions: str = ""
  """With --videos: captions by video name, a .json object, .jsonl lines {"video", "caption"} or a .csv with
  video and caption columns."""
  model: str = ""
  """With --videos: a Wan diffusers folder; its vae/, text_encoder/ and tokenizer/ encode clips and captions."""
  fps: float = 16.0
  """With --videos: the clips' frame rate (Wan2.1 is trained at 16); a folder of frames is read at this rate."""
  vae_dtype: Literal["float32", "bfloat16"] = "float32"
  """With --videos: the VAE's parameters and compute (--config.compute_dtype sets the text encoder's)."""
  read_workers: int = 8
  """With --videos: threads decoding videos ahead of the encoders."""
  num_examples: int = 256
  """Videos to write (synthetic and teacher)."""
  examples_per_shard: int = 64
  """Videos per safetensors shard."""
  num_steps: int = 30
  """With --source teacher: Euler steps per sample."""
  shift: float = 5.0
  """With --source teacher: timestep shift of the sampler (Wan samples with 5)."""
  coordinator_address: str | None = None
  """host:port of process 0, for encoding over several processes (or JAX_COORDINATOR_ADDRESS)."""
  num_processes: int | None = None
  """Number of processes (or JAX_NUM_PROCESSES)."""
  process_id: int | None = None
  """This process's index (or JAX_PROCESS_ID)."""

  @property
  def kind(self) -> str:
    return self.source or ("videos" if self.videos else "synthetic")


def synthetic(config: DatasetConfig, num_examples: int) -> MovingShapes:
  return sources.synthetic(
    num_examples, config.frames, config.height, config.width, config.text_len, config.model, config.seed
  )


def captions(config: DatasetConfig, num_examples: int) -> Source:
  """Where teacher samples get their text: ``config.captions`` if set, else synthetic captions."""
  if config.captions:
    return sources.dataset(config.captions, config.model, field="--config.captions")
  return synthetic(config, num_examples)


def teacher_examples(
  config: DatasetConfig, num_examples: int, *, num_steps: int, shift: float
) -> Iterator[dict[str, np.ndarray]]:
  """Teacher samples, ``config.batch_size`` at a time; noise for example i depends on (seed, i) only."""
  teacher_config = config.teacher_model()
  mesh = sharding.make_mesh(-1, 1)
  graphdef, state = abstract_model(teacher_config)
  shardings = sharding.param_shardings(state, mesh)
  params, description = load_teacher(config.teacher, teacher_config, state.to_pure_dict(), shardings, config.seed)
  print(f"teacher: {description}")
  texts = captions(config, num_examples)
  latent_shape = (config.frames, config.height, config.width, config.model.in_channels)
  dtype = teacher_config.compute_dtype

  @jax.jit
  def sample(params, noise, context):
    def velocity(x, t):
      return nnx.merge(graphdef, params)(x.astype(dtype), t, context.astype(dtype)).astype(x.dtype)

    return flow.euler_sample(velocity, noise, num_steps=num_steps, shift=shift)

  key = jax.random.key(config.seed)
  for start in range(0, num_examples, config.batch_size):
    indices = range(start, min(start + config.batch_size, num_examples))
    context = np.stack([texts.get(i % len(texts))["context"] for i in indices])
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), latent_shape) for i in indices])
    latents = np.asarray(sample(params, noise, context))
    for row in range(len(indices)):
      yield {"latents": latents[row], "context": context[row]}


# ----------------------------------------------------------------------------- videos

PARTIAL_SUFFIX = ".partial"
REPORT = "report.json"


def read_model_configs(folder: str) -> tuple[WanVAEConfig, UMT5Config]:
  """The VAE and text-encoder configs of a Wan diffusers folder, read before any weights; ValueError naming
  ``--model`` if the folder lacks a part."""
  for part in ("vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json"):
    if not os.path.isfile(os.path.join(folder, part)):
      raise ValueError(f"--model {folder!r}: not a Wan diffusers folder ({part} is missing)")
  fields = {}
  for part in ("vae", "text_encoder"):
    path = os.path.join(folder, part, "config.json")
    try:
      with open(path) as f:
        fields[part] = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"--model: {path} cannot be read as JSON ({e})") from None
  try:
    vae = wan_vae.config_from_diffusers(fields["vae"])
  except ValueError as e:
    raise ValueError(f"--model: {os.path.join(folder, 'vae', 'config.json')}: {e}") from None
  text = umt5.config_from_transformers(
    fields["text_encoder"], source=os.path.join(folder, "text_encoder", "config.json")
  )
  return vae, text


def check_encoders_fit(config: DatasetConfig, vae: WanVAEConfig, text: UMT5Config) -> None:
  """The encoders' widths against the model's: ValueError naming the field."""
  if vae.z_dim != config.model.in_channels:
    raise ValueError(
      f"--config.model.in_channels={config.model.in_channels}: the VAE makes {vae.z_dim}-channel latents "
      "(pick the preset of the model, e.g. --config wan2_1_1_3b)"
    )
  if text.d_model != config.model.text_dim:
    raise ValueError(
      f"--config.model.text_dim={config.model.text_dim}: the text encoder is {text.d_model} wide "
      "(pick the preset of the model, e.g. --config wan2_1_1_3b)"
    )


def clip_spec(config: DatasetConfig, vae: WanVAEConfig, fps: float) -> videos.ClipSpec:
  """The pixel clip whose latents are ``config.frames x height x width``: 1 + 4 (frames - 1) frames, 8x the size."""
  t, s = vae.temporal_compression, vae.spatial_compression
  return videos.ClipSpec(frames=1 + t * (config.frames - 1), height=s * config.height, width=s * config.width, fps=fps)


class Encoders:
  """The VAE, replicated over this process's devices with the clips split among them, and the text encoder
  (on the first local device). ``latents`` and ``text`` return float32 host arrays."""

  def __init__(self, vae: wan_vae.WanVAE, tokenizer: umt5.WanTokenizer, text_encoder: umt5.UMT5Encoder, text_len: int):
    self.mesh = Mesh(np.array(jax.local_devices()), ("clips",))
    self.vae_config, self.tokenizer, self.text_encoder, self.text_len = vae.config, tokenizer, text_encoder, text_len
    graphdef, state = nnx.split(vae)
    self._vae_state = jax.device_put(state, NamedSharding(self.mesh, P()))
    self._clips = NamedSharding(self.mesh, P("clips"))
    dtype = vae.dtype

    def encode(state, clips):
      video = clips.astype(dtype) / 127.5 - 1  # uint8 to [-1, 1] on the device: a quarter of the transfer
      mean = nnx.merge(graphdef, state).encode(video)
      return wan_vae.normalize_latents(mean.astype(jnp.float32), self.vae_config)

    self._encode = jax.jit(encode, out_shardings=self._clips)

  @classmethod
  def load(cls, folder: str, *, vae_dtype, text_dtype, text_len: int) -> Encoders:
    return cls(
      wan_vae.load_wan_vae(os.path.join(folder, "vae"), dtype=vae_dtype),
      umt5.load_tokenizer(os.path.join(folder, "tokenizer")),
      umt5.load_umt5_encoder(os.path.join(folder, "text_encoder"), dtype=text_dtype),
      text_len,
    )

  @property
  def batch_multiple(self) -> int:
    return self.mesh.size

  def latents(self, clips: np.ndarray) -> np.ndarray:
    """uint8 [batch, frames, height, width, 3] (batch a multiple of the local devices) -> normalised latents."""
    return np.asarray(self._encode(self._vae_state, jax.device_put(clips, self._clips)))

  def text(self, captions: list[str]) -> np.ndarray:
    """captions -> [batch, text_len, d_model], zero past each caption's tokens."""
    return np.asarray(umt5.encode_prompts(self.tokenizer, self.text_encoder, captions, self.text_len), np.float32)


class ClipStore:
  """``<out>.partial/``: one safetensors file per encoded clip and one JSON file per skipped clip, each written
  whole (``atomic_write``), so a killed run loses at most the clips in flight. ``settings.json`` records what
  the clips were made with; a resume with other settings is refused."""

  def __init__(self, path: str, settings: dict):
    self.path = path
    os.makedirs(path, exist_ok=True)
    settings_file = os.path.join(path, "settings.json")
    if os.path.exists(settings_file):
      with open(settings_file) as f:
        stored = json.load(f)
      differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
      if differ:
        raise ValueError(
          f"{path} holds clips made with other settings ({', '.join(differ)} differ); "
          "rerun with the same ones or remove it"
        )
    else:
      write_json_atomic(settings_file, settings)

  def _file(self, index: int, kind: str) -> str:
    return os.path.join(self.path, f"{kind}-{index:07d}.{'safetensors' if kind == 'clip' else 'json'}")

  def finished(self, index: int) -> bool:
    return os.path.exists(self._file(index, "clip")) or os.path.exists(self._file(index, "skip"))

  def put(self, index: int, latents: np.ndarray, context: np.ndarray) -> None:
    data = safetensors.numpy.save({"latents": np.ascontiguousarray(latents), "context": np.ascontiguousarray(context)})
    write_bytes_atomic(self._file(index, "clip"), data)

  def skip(self, index: int, video: str, reason: str) -> None:
    write_json_atomic(self._file(index, "skip"), {"video": video, "reason": reason})

  def get(self, index: int) -> dict[str, np.ndarray] | None:
    file = self._file(index, "clip")
    return safetensors.numpy.load_file(file) if os.path.exists(file) else None

  def skipped(self, index: int) -> dict | None:
    file = self._file(index, "skip")
    if not os.path.exists(file):
      return None
    with open(file) as f:
      return json.load(f)


def _read(video: videos.Video, caption: str | None, spec: videos.ClipSpec) -> tuple[np.ndarray | None, str]:
  """(the clip, its caption), or (None, why it cannot be used)."""
  if caption is None:
    return None, "no caption in --captions"
  try:
    return videos.read_clip(video.path, spec), caption
  except videos.VideoError as e:
    return None, str(e)


def encode_videos(
  args: Args, encoders: Encoders | None = None, *, progress: bool = True
) -> tuple[dict | None, dict | None]:
  """Encodes every video of ``args.videos`` with its caption into ``<args.out>.partial``, this process taking
  every ``process_count``-th video, in batches of ``config.batch_size`` rounded up to a multiple of the local
  devices; then process 0 writes the dataset and ``report.json`` to ``args.out`` and removes the partial
  folder. Returns (the manifest, the report) on process 0, (None, None) elsewhere.

  encoders: built from ``args.model`` when not given (the benchmark passes random-weight ones).
  """
  config = args.config
  listed = videos.list_videos(args.videos)
  if not listed:
    raise ValueError(f"--videos {args.videos!r}: no videos found ({', '.join(videos.VIDEO_SUFFIXES)} or frame folders)")
  captions = videos.read_captions(args.captions)
  if encoders is None:
    vae_config, text_config = read_model_configs(args.model)
    check_encoders_fit(config, vae_config, text_config)
  else:
    vae_config = encoders.vae_config
  spec = clip_spec(config, vae_config, args.fps)
  process, processes = jax.process_index(), jax.process_count()
  multiple = encoders.batch_multiple if encoders is not None else jax.local_device_count()
  batch_size = -(-config.batch_size // multiple) * multiple
  settings = {
    "videos": [v.name for v in listed],
    "captions": [videos.caption_for(captions, v) for v in listed],
    "model": os.path.abspath(args.model) if args.model else "",
    "clip": dataclasses.asdict(spec),
    "latents": [config.frames, config.height, config.width],
    "text_len": config.text_len,
    "dtypes": [args.vae_dtype, config.compute_dtype],
    "batches": [processes, batch_size],
  }
  store = ClipStore(args.out.rstrip(os.sep) + PARTIAL_SUFFIX, settings)
  mine = list(range(process, len(listed), processes))
  batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
  todo = [b for b in batches if not all(store.finished(i) for i in b)]
  if todo and encoders is None:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    encoders = Encoders.load(
      args.model, vae_dtype=dtype[args.vae_dtype], text_dtype=dtype[config.compute_dtype], text_len=config.text_len
    )
  done = len(mine) - sum(len(b) for b in todo)
  bar = tqdm(total=len(mine), initial=done, unit="clip", disable=not (progress and process == 0), dynamic_ncols=True)
  with concurrent.futures.ThreadPoolExecutor(max(1, args.read_workers)) as pool:

    def submit(batch):
      return [pool.submit(_read, listed[i], videos.caption_for(captions, listed[i]), spec) for i in batch]

    pending = collections.deque(submit(b) for b in todo[:2])  # decoding runs a batch ahead of the encoders
    for position, batch in enumerate(todo):
      results = [future.result() for future in pending.popleft()]
      if position + 2 < len(todo):
        pending.append(submit(todo[position + 2]))
      good = [(i, clip, caption) for i, (clip, caption) in zip(batch, results) if clip is not None]
      for i, (clip, reason) in zip(batch, results):
        if clip is None:
          store.skip(i, listed[i].name, reason)
      if good:
        padding = [good[-1]] * (batch_size - len(good))  # one compiled shape for every batch
        latents = encoders.latents(np.stack([clip for _, clip, _ in good + padding]))
        context = encoders.text([caption for _, _, caption in good + padding])
        for row, (i, _, _) in enumerate(good):
          store.put(i, latents[row], context[row])
      bar.update(len(batch))
  bar.close()
  if processes > 1:
    multihost_utils.sync_global_devices("train.make_dataset: clips encoded")
  if process != 0:
    return None, None
  return assemble(args, store, listed)


def assemble(args: Args, store: ClipStore, listed: list[videos.Video]) -> tuple[dict, dict]:
  """The dataset from the stored clips in the order of ``listed``, its report, and the partial folder removed."""
  written, skipped = [], []
  for i in range(len(listed)):
    reason = store.skipped(i)
    if reason is not None:
      skipped.append(reason)
    else:
      written.append(i)
  with open(os.path.join(store.path, "settings.json")) as f:
    settings = json.load(f)
  report = {
    "videos": len(listed),
    "written": len(written),
    "skipped": skipped,
    "examples": [{"video": listed[i].name, "caption": settings["captions"][i]} for i in written],
  }
  if not written:
    write_json_atomic(os.path.join(store.path, REPORT), report)
    raise ValueError(
      f"none of the {len(listed)} videos could be used; the reasons are in {os.path.join(store.path, REPORT)}"
    )
  manifest = write_dataset(args.out, (store.get(i) for i in written), examples_per_shard=args.examples_per_shard)
  write_json_atomic(os.path.join(args.out, REPORT), report)
  shutil.rmtree(store.path)
  return manifest, report


def check(args: Args) -> None:
  config = args.config
  validate_model(config)
  require = checker(config)
  for axis, name in enumerate(("frames", "height", "width")):
    patch = config.model.patch_size[axis]
    require(
      getattr(config, name) >= 1 and getattr(config, name) % patch == 0,
      name,
      f"must be a positive multiple of the patch size {patch}",
    )
  grid = patch_grid(config.model, config.frames, config.height, config.width)
  require(max(grid) <= config.model.rope_max_seq_len, "model.rope_max_seq_len", f"must cover the patch grid {grid}")
  require(config.text_len >= 3, "text_len", "must be >= 3")
  require(config.batch_size >= 1, "batch_size", "must be >= 1")
  require(config.seed >= 0, "seed", "must be >= 0")
  for name in ("num_examples", "examples_per_shard", "num_steps", "read_workers"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
  if args.shift <= 0:
    raise ValueError(f"--shift must be > 0, got {args.shift}")
  if args.kind == "videos":
    for name in ("videos", "captions", "model"):
      if not getattr(args, name):
        raise ValueError(f"--{name} is required with --source videos")
    if not args.fps > 0:
      raise ValueError(f"--fps must be > 0, got {args.fps}")
  elif args.videos:
    raise ValueError(f"--videos is only read with --source videos, not --source {args.kind}")
  check_new_directory(args.out, "--out")  # before the sampling or encoding, the long part
  distill.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)


@errors.command
def main(argv: list[str] | None = None) -> int:
  args, code = cli.parse(
    Args,
    argv,
    prog="train.make_dataset",
    description=__doc__,
    presets=PRESETS,
    default="tiny",
    project=DatasetConfig.from_config,
    check=check,
  )
  if code is not None:
    return code
  config, n = args.config, args.num_examples
  if args.kind == "teacher" and config.teacher == "random":
    print("note: --config.teacher=random samples an untrained model; pass a diffusers folder or a workdir")
  if args.kind == "videos":
    manifest, report = encode_videos(args)
    if manifest is None:
      return 0  # not process 0: that one writes the dataset
    print(
      f"{report['written']} of {report['videos']} videos encoded; {len(report['skipped'])} skipped "
      f"(listed with the reasons in {os.path.join(args.out, REPORT)})"
    )
  else:
    if args.kind == "synthetic":
      shapes = synthetic(config, n)
      examples = (shapes.get(i) for i in range(n))
    else:
      examples = teacher_examples(config, n, num_steps=args.num_steps, shift=args.shift)
    manifest = write_dataset(
      args.out, tqdm(examples, total=n, unit="video"), examples_per_shard=args.examples_per_shard
    )
  print(
    f"wrote {manifest['num_examples']} examples in {len(manifest['shards'])} shards to {args.out} "
    f"(latents {manifest['latent_shape']}, text {manifest['text_shape']})"
  )
  print(f"train on it: {cli.command('train.distill')} --config.data.path={args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
