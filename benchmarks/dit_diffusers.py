"""diffusers' `WanTransformer3DModel` in PyTorch: one denoising step, eager and under `torch.compile`.

    python -m benchmarks.dit_diffusers --config-json '{"num_layers": 30, ...}' --latent 21 60 104

`benchmarks.dit` runs this in a child process before jax takes the GPU, with the architecture of the model
it times (`config_to_diffusers`), and reads its result: one JSON object, the last line of stdout. Random
weights of the real shapes in bf16, except the modules diffusers keeps in float32 when it loads a bf16
checkpoint (`_keep_in_fp32_modules`: norms, modulation tables, time embedding, RoPE tables); batch 1,
diffusers' default attention (`scaled_dot_product_attention`, torch choosing its kernel). Times are medians
of `--runs` calls after warm-up (`torch_timing.median_ms`); `torch.compile`'s first calls are its warm-up.
Needs torch and diffusers; imports nothing from jax.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from benchmarks import torch_timing


def _keep_in_float32(model, torch):
  """Casts back to float32 what diffusers keeps in float32 when loading with torch_dtype=bfloat16."""
  keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
  for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
    if keep & set(name.split(".")) and tensor.is_floating_point():
      tensor.data = tensor.data.to(torch.float32)
  return sorted(keep)


def run(fields: dict, *, latent, text_len: int, runs: int, compile: bool = True) -> dict:
  """Times one forward of WanTransformer3DModel(**fields) on [1, in_channels, *latent] latents."""
  import diffusers
  import torch
  from diffusers import WanTransformer3DModel

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  with torch.device(device):
    model = WanTransformer3DModel(**fields).eval()
  # nn.Module's own cast: diffusers' override warns that it keeps nothing in float32; _keep_in_float32 does.
  torch.nn.Module.to(model, torch.bfloat16)
  kept_in_float32 = _keep_in_float32(model, torch)
  generator = torch.Generator(device=device).manual_seed(1)
  latents = torch.randn(1, fields["in_channels"], *latent, device=device, dtype=torch.bfloat16, generator=generator)
  context = torch.randn(1, text_len, fields["text_dim"], device=device, dtype=torch.bfloat16, generator=generator)
  timestep = torch.tensor([500], device=device)

  def step(module):
    def call():
      with torch.inference_mode():
        return module(latents, timestep, context, return_dict=False)[0]

    return call

  out = step(model)()
  result = {
    "device": torch_timing.device_name(),
    "versions": {**torch_timing.versions(), "diffusers": diffusers.__version__},
    "output_shape": list(out.shape),
    "kept_in_float32": kept_in_float32,
    "eager_ms": torch_timing.median_ms(step(model), warmup=2, samples=runs, calls_per_sample=1),
  }
  print(f"diffusers eager: {result['eager_ms']:.1f} ms", file=sys.stderr, flush=True)
  if compile:
    compiled = step(torch.compile(model))
    try:
      start = time.perf_counter()
      compiled()
      result["compile_s"] = time.perf_counter() - start
      result["compiled_ms"] = torch_timing.median_ms(compiled, warmup=2, samples=runs, calls_per_sample=1)
      print(f"diffusers torch.compile: {result['compiled_ms']:.1f} ms", file=sys.stderr, flush=True)
    except Exception as e:  # "where it compiles": a compile failure is a result, not a crash
      traceback.print_exc(limit=3)
      result["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
  if torch.cuda.is_available():
    result["peak_bytes"] = torch.cuda.max_memory_allocated()
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config-json", required=True, help="WanTransformer3DModel's arguments, as JSON")
  parser.add_argument("--latent", type=int, nargs=3, required=True, metavar=("FRAMES", "HEIGHT", "WIDTH"))
  parser.add_argument("--text-len", type=int, default=512)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--no-compile", action="store_true", help="eager only")
  args = parser.parse_args(argv)
  try:
    fields = json.loads(args.config_json)
  except json.JSONDecodeError as e:
    parser.error(f"--config-json is not JSON: {e}")
  if not isinstance(fields, dict) or not {"in_channels", "text_dim"} <= fields.keys():
    parser.error("--config-json must be an object with at least in_channels and text_dim")
  if min(*args.latent, args.text_len, args.runs) < 1:
    parser.error("--latent, --text-len and --runs must be >= 1")
  result = run(fields, latent=tuple(args.latent), text_len=args.text_len, runs=args.runs, compile=not args.no_compile)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
