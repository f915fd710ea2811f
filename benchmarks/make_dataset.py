"""make_dataset throughput at 480p: synthetic clips through random-weight full-size Wan2.1 VAE and UMT5-XXL.

    python -m benchmarks.make_dataset                       # 16 clips of 1280x720 at 24 fps, 6 s each
    python -m benchmarks.make_dataset --clips 32 --batch 8 --vae_dtype bfloat16
    python -m benchmarks.make_dataset --model PATH/Wan2.1-T2V-1.3B-Diffusers   # that folder's encoders

Nothing is downloaded: the encoders have random weights of the real sizes (the VAE of Wan2.1, UMT5-XXL in
bfloat16) and the tokenizer is the tiny test fixture's (its ids are valid UMT5 ids), so the time is the real
one. The clips are written first (H.264), then ``train.make_dataset``'s own loop (``encode_videos``) runs
once on one batch to compile and once on all clips, timed: clips/s is the second run's. Also timed alone:
decoding and resizing one clip, the VAE on one batch, the text encoder on one batch; and the peak device
memory. Prints one JSON object and writes it to benchmarks/results/make_dataset-<device>.json (``--out``).
With ``--model`` the VAE, tokenizer and text encoder come from a Wan diffusers folder instead; ``--latents``
sets the clip size as latent frames, height and width (default the 1.3B preset's, 81 x 480 x 832 pixels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.results import results_path, write_results
from sparge_jax.models import umt5, wan_vae
from train import make_dataset, videos
from train.configs import wan2_1_1_3b

TOKENIZER = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests/fixtures/umt5_tiny/tokenizer"
)


def write_clips(folder: str, count: int, width: int, height: int, fps: int, seconds: float) -> str:
  """``count`` H.264 clips of moving shapes on a gradient; returns the captions file."""
  import imageio_ffmpeg  # noqa: PLC0415

  frames = int(round(fps * seconds))
  y, x = np.mgrid[:height, :width].astype(np.float32)
  captions = {}
  for clip in range(count):
    writer = imageio_ffmpeg.write_frames(
      os.path.join(folder, f"clip{clip:03d}.mp4"), (width, height), fps=fps, codec="libx264", quality=7,
      ffmpeg_log_level="error", macro_block_size=1,
    )  # fmt: skip
    writer.send(None)
    for f in range(frames):
      frame = np.stack([(x / width * 200 + f) % 255, (y / height * 200 + clip * 10) % 255, 128 + 0 * x], -1)
      s = height // 4
      top, left = (f * 3) % (height - s), (f * 5 + clip * 37) % (width - s)
      frame[top : top + s, left : left + s] = (230, 40, 40)
      writer.send(np.ascontiguousarray(frame.astype(np.uint8)))
    writer.close()
    captions[f"clip{clip:03d}.mp4"] = f"a red square crosses a moving gradient, take {clip}"
  path = os.path.join(folder, "captions.json")
  with open(path, "w") as f:
    json.dump(captions, f)
  return path


def random_encoders(vae_dtype, text_len: int) -> make_dataset.Encoders:
  vae = wan_vae.WanVAE(wan_vae.WanVAEConfig(), rngs=nnx.Rngs(0), param_dtype=vae_dtype, dtype=vae_dtype)
  text_encoder = umt5.UMT5Encoder(umt5.umt5_xxl(), rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  return make_dataset.Encoders(vae, umt5.load_tokenizer(TOKENIZER), text_encoder, text_len)


def peak_memory_gib() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / 2**30 or None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="", help="a Wan diffusers folder to take the encoders from")
  parser.add_argument("--latents", type=int, nargs=3, metavar=("FRAMES", "HEIGHT", "WIDTH"), default=None)
  parser.add_argument("--clips", type=int, default=16)
  parser.add_argument("--batch", type=int, default=0, help="clips per encoder call (0: one per local device)")
  parser.add_argument("--source", default="1280x720", help="the clips' size, WIDTHxHEIGHT")
  parser.add_argument("--fps", type=int, default=24)
  parser.add_argument("--seconds", type=float, default=6.0)
  parser.add_argument("--vae_dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--read_workers", type=int, default=8)
  parser.add_argument(
    "--out", default=None, help="results file (default benchmarks/results/make_dataset-<device>.json)"
  )
  args = parser.parse_args(argv)
  try:
    width, height = (int(v) for v in args.source.split("x"))
  except ValueError:
    parser.error(f"--source must be WIDTHxHEIGHT, got {args.source!r}")
  if args.clips < 1 or args.batch < 0:
    parser.error("--clips must be at least 1 and --batch at least 0")
  if args.model and not os.path.isdir(os.path.join(args.model, "vae")):
    parser.error(f"--model {args.model}: not a Wan diffusers folder (no vae/)")
  preset = make_dataset.DatasetConfig.from_config(wan2_1_1_3b())
  batch = args.batch or jax.local_device_count()
  config = dataclasses.replace(preset, batch_size=batch, compute_dtype="bfloat16")
  if args.latents:
    config = dataclasses.replace(config, **dict(zip(("frames", "height", "width"), args.latents)))
  vae_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.vae_dtype]

  with tempfile.TemporaryDirectory() as root:
    clips = os.path.join(root, "clips")
    os.makedirs(clips)
    start = time.perf_counter()
    captions = write_clips(clips, args.clips, width, height, args.fps, args.seconds)
    print(f"wrote {args.clips} clips of {width}x{height} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    if args.model:
      encoders = make_dataset.Encoders.load(
        args.model, vae_dtype=vae_dtype, text_dtype=jnp.bfloat16, text_len=config.text_len
      )
    else:
      encoders = random_encoders(vae_dtype, config.text_len)
    init_s = time.perf_counter() - start
    spec = make_dataset.clip_spec(config, encoders.vae_config, 16.0)

    def run(listing: str, out: str) -> float:
      run_args = make_dataset.Args(
        config=config, out=os.path.join(root, out), videos=listing, captions=captions, vae_dtype=args.vae_dtype,
        read_workers=args.read_workers,
      )  # fmt: skip
      start = time.perf_counter()
      make_dataset.encode_videos(run_args, encoders)
      return time.perf_counter() - start

    warmup = os.path.join(root, "warmup.txt")
    with open(warmup, "w") as f:
      f.write("\n".join(os.path.join(clips, f"clip{i:03d}.mp4") for i in range(batch)))
    compile_s = run(warmup, "warmup")
    total_s = run(clips, "timed")

    listed = videos.list_videos(clips)
    start = time.perf_counter()
    clip = videos.read_clip(listed[0].path, spec)
    read_s = time.perf_counter() - start
    batch_clips = np.stack([clip] * batch)
    encoders.latents(batch_clips)
    start = time.perf_counter()
    encoders.latents(batch_clips)
    vae_s = time.perf_counter() - start
    start = time.perf_counter()
    encoders.text(["a red square crosses a moving gradient"] * batch)
    text_s = time.perf_counter() - start

  results = {
    "devices": jax.local_device_count(),
    "encoders": os.path.abspath(args.model) if args.model else "random weights of the real sizes",
    "clip": f"{spec.frames} frames of {spec.width}x{spec.height} from {width}x{height} at {args.fps} fps",
    "batch": batch,
    "vae_dtype": args.vae_dtype,
    "clips": args.clips,
    "clips_per_s": args.clips / total_s,
    "seconds_total": total_s,
    "seconds_first_batch_with_compilation": compile_s,
    "seconds_encoders_init": init_s,
    "seconds_decode_resize_one_clip": read_s,
    "seconds_vae_one_batch": vae_s,
    "seconds_text_one_batch": text_s,
    "peak_memory_gib": peak_memory_gib(),
  }
  print(json.dumps(results, indent=1))
  out = args.out or results_path("make_dataset")
  write_results(out, results)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
