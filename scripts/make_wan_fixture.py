"""Write the Wan parity fixtures: tiny random diffusers `WanTransformer3DModel`s and their outputs.

Runs in its own environment with torch (CPU) and diffusers, which the library itself never needs:

    python3.11 -m venv ~/parity-venv
    ~/parity-venv/bin/pip install torch==2.13.0 diffusers==0.42.1 transformers accelerate safetensors numpy
    ~/parity-venv/bin/python scripts/make_wan_fixture.py

For each case it writes tests/fixtures/<case>/transformer/ (diffusers' own save_pretrained output:
config.json + diffusion_pytorch_model.safetensors) and tests/fixtures/<case>/io.safetensors with the
inputs and the float32 output in diffusers' layout:
  x: [batch, channels, frames, height, width], t: [batch], context: [batch, text_len, text_dim],
  out: [batch, out_channels, frames, height, width].

Every parameter is random, norms and modulation tables included, and the latent's frames, height and
width differ (and out_channels differs from in_channels), so a transposed axis, a wrong RoPE split,
a mis-ordered modulation row or an unpatchify mix-up cannot pass tests/test_wan_parity.py.
"""

import argparse
import math
import shutil
from pathlib import Path

import diffusers
import torch
from diffusers import WanTransformer3DModel
from safetensors.numpy import save_file

CASES = {
  # The published layout: patch (1, 2, 2), cross-attention norm on. Patch grid 3 x 5 x 7.
  "wan_tiny": dict(
    config=dict(
      patch_size=(1, 2, 2),
      num_attention_heads=2,
      attention_head_dim=16,
      in_channels=4,
      out_channels=6,
      text_dim=24,
      freq_dim=16,
      ffn_dim=64,
      num_layers=2,
      cross_attn_norm=True,
      qk_norm="rms_norm_across_heads",
      eps=1e-6,
      rope_max_seq_len=1024,
    ),
    latent=(2, 4, 3, 10, 14),
    text_len=7,
    timesteps=(37.0, 841.5),
  ),
  # A temporal patch, no cross-attention norm, 2 heads of 12 (rotary split 4/4/4). Patch grid 2 x 3 x 4.
  "wan_tiny_patch222": dict(
    config=dict(
      patch_size=(2, 2, 2),
      num_attention_heads=2,
      attention_head_dim=12,
      in_channels=5,
      out_channels=3,
      text_dim=20,
      freq_dim=32,
      ffn_dim=40,
      num_layers=2,
      cross_attn_norm=False,
      qk_norm="rms_norm_across_heads",
      eps=1e-6,
      rope_max_seq_len=1024,
    ),
    latent=(1, 5, 4, 6, 8),
    text_len=4,
    timesteps=(603.25,),
  ),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Every parameter random: matrices scaled by fan-in, norm weights around 1, biases and tables small."""
  for name, param in model.named_parameters():
    noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
    if "norm" in name and name.endswith("weight"):
      param.copy_(1.0 + 0.3 * noise)
    elif param.ndim >= 2 and "scale_shift_table" not in name:
      fan_in = math.prod(param.shape[1:])
      param.copy_(noise / math.sqrt(fan_in))
    else:
      param.copy_(0.3 * noise)


def make_case(name: str, spec: dict, root: Path, seed: int) -> None:
  generator = torch.Generator().manual_seed(seed)
  model = WanTransformer3DModel(**spec["config"]).eval()
  randomize(model, generator)
  x = torch.randn(spec["latent"], generator=generator)
  t = torch.tensor(spec["timesteps"], dtype=torch.float32)
  context = torch.randn((x.shape[0], spec["text_len"], spec["config"]["text_dim"]), generator=generator)
  with torch.no_grad():
    out = model(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]

  folder = root / name
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder / "transformer", safe_serialization=True)
  save_file(
    {"x": x.numpy(), "t": t.numpy(), "context": context.numpy(), "out": out.numpy()},
    folder / "io.safetensors",
    metadata={"diffusers": diffusers.__version__, "torch": torch.__version__},
  )
  size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
  print(f"{name}: out {tuple(out.shape)}, |out| max {out.abs().max():.3f}, {size / 1024:.0f} KiB in {folder}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures")
  args = parser.parse_args()
  torch.set_num_threads(1)  # one thread: the reference sums in a fixed order
  for seed, (name, spec) in enumerate(CASES.items()):
    make_case(name, spec, args.out, seed)


if __name__ == "__main__":
  main()
