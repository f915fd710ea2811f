"""Write the Wan VAE parity fixture: a tiny random diffusers `AutoencoderKLWan` and its encode/decode outputs.

Runs in its own environment with torch (CPU) and diffusers, which the library itself never needs:

    python3.11 -m venv ~/parity-venv
    ~/parity-venv/bin/pip install torch==2.13.0 diffusers==0.42.1 safetensors numpy
    ~/parity-venv/bin/python scripts/make_wan_vae_fixture.py

It writes tests/fixtures/wan_vae_tiny/vae/ (diffusers' own save_pretrained output: config.json +
diffusion_pytorch_model.safetensors) and tests/fixtures/wan_vae_tiny/io.safetensors, float32, in diffusers'
layout [batch, channels, frames, height, width]:
  video [2, 3, 9, 16, 24] in [-1, 1]  -> mean, logvar [2, z_dim, 3, 2, 3]   (first frame + two 4-frame chunks)
  latents [2, z_dim, 4, 3, 4]          -> decoded [2, 3, 13, 24, 32]        (four one-latent-frame chunks)
  video_1 [1, 3, 1, 16, 24]            -> mean_1, logvar_1                  (a single frame)
  latents_1 [1, z_dim, 1, 3, 4]        -> decoded_1 [1, 3, 1, 24, 32]

The model has Wan2.1's structure (three spatial halvings, the last two also temporal; mid-block attention;
a decoder_base_dim differing from base_dim) at a tiny width. Every parameter is random, RMS-norm gammas
included, and the decoder's output layer is scaled so that few outputs reach diffusers' [-1, 1] clamp.
"""

import argparse
import math
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan
from safetensors.numpy import save_file

CONFIG = dict(
  base_dim=8,
  decoder_base_dim=6,
  z_dim=4,
  dim_mult=[1, 2, 2, 2],
  num_res_blocks=1,
  attn_scales=[],
  temperal_downsample=[False, True, True],
  dropout=0.0,
  latents_mean=[0.31, -0.52, 1.7, -0.08],
  latents_std=[1.9, 0.45, 2.6, 1.2],
)


@torch.no_grad()
def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Every parameter random: kernels scaled by fan-in, gammas around 1, biases small."""
  for name, param in model.named_parameters():
    noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
    if name.endswith("gamma"):
      param.copy_(1.0 + 0.3 * noise)
    elif param.ndim >= 2:
      fan_in = math.prod(param.shape[1:])
      gain = 0.7 if name == "decoder.conv_out.weight" else 1.0
      param.copy_(gain * noise / math.sqrt(fan_in))
    else:
      param.copy_(0.1 * noise)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures")
  args = parser.parse_args()
  torch.set_num_threads(1)  # one thread: the reference sums in a fixed order
  generator = torch.Generator().manual_seed(0)
  model = AutoencoderKLWan(**CONFIG).eval()
  randomize(model, generator)
  z_dim = CONFIG["z_dim"]

  def video(shape):
    return torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1

  tensors = {
    "video": video((2, 3, 9, 16, 24)),
    "latents": torch.randn((2, z_dim, 4, 3, 4), generator=generator),
    "video_1": video((1, 3, 1, 16, 24)),
    "latents_1": torch.randn((1, z_dim, 1, 3, 4), generator=generator),
  }
  with torch.no_grad():
    for suffix in ("", "_1"):
      posterior = model.encode(tensors["video" + suffix]).latent_dist
      tensors["mean" + suffix], tensors["logvar" + suffix] = posterior.mean, posterior.logvar
      tensors["decoded" + suffix] = model.decode(tensors["latents" + suffix]).sample

  folder = args.out / "wan_vae_tiny"
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder / "vae", safe_serialization=True)
  save_file(
    {name: t.contiguous().numpy() for name, t in tensors.items()},
    folder / "io.safetensors",
    metadata={"diffusers": diffusers.__version__, "torch": torch.__version__},
  )
  size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
  decoded = tensors["decoded"]
  clamped = float((decoded.abs() >= 1).float().mean())
  print(f"mean {tuple(tensors['mean'].shape)} |max| {tensors['mean'].abs().max():.3f}")
  print(f"decoded {tuple(decoded.shape)}, {100 * clamped:.1f}% at the clamp; {size / 1024:.0f} KiB in {folder}")


if __name__ == "__main__":
  main()
