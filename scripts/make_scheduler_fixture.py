"""Whole sampling runs of diffusers' flow-matching schedulers, for tests/test_schedulers.py.

    ~/parity-venv/bin/python scripts/make_scheduler_fixture.py   # diffusers 0.42.x, torch (CPU): see make_wan_fixture.py

Each case builds `UniPCMultistepScheduler` (Wan's scheduler config, with the case's overrides) or
`FlowMatchEulerDiscreteScheduler`, and integrates a fixed deterministic "model" from fixed noise:

    model_output = weight * sample + (timestep / 1000) * slope + offset

(elementwise; weight, slope, offset fixed random float32 arrays), recording the sample after every step.
Writes tests/fixtures/schedulers/{trajectories.safetensors, cases.json}: per case the timesteps and sigmas of
`set_timesteps` and the samples [num_steps + 1, ...] (the noise first).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "schedulers")
SHAPE = (2, 3, 4, 5)

# Wan2.1's scheduler/scheduler_config.json (480p: flow_shift 3.0; Wan uses 5.0 at 720p).
WAN_UNIPC = dict(
  num_train_timesteps=1000,
  beta_start=0.0001,
  beta_end=0.02,
  beta_schedule="linear",
  solver_order=2,
  prediction_type="flow_prediction",
  thresholding=False,
  predict_x0=True,
  solver_type="bh2",
  lower_order_final=True,
  disable_corrector=[],
  use_flow_sigmas=True,
  flow_shift=3.0,
  timestep_spacing="linspace",
  steps_offset=0,
  final_sigmas_type="zero",
)

CASES = [
  *(
    dict(name=f"unipc_{steps}_shift{shift:g}", kind="unipc", steps=steps, config={**WAN_UNIPC, "flow_shift": shift})
    for steps in (10, 50)
    for shift in (3.0, 5.0)
  ),
  dict(name="unipc_12_order3", kind="unipc", steps=12, config={**WAN_UNIPC, "solver_order": 3}),
  # bh1 at a final sigma of zero is inf * 0 in diffusers (NaN), so with sigma_min.
  dict(
    name="unipc_7_bh1_sigma_min",
    kind="unipc",
    steps=7,
    config={**WAN_UNIPC, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
  ),
  dict(name="unipc_8_order1", kind="unipc", steps=8, config={**WAN_UNIPC, "solver_order": 1}),
  dict(name="unipc_9_no_corrector_0_1", kind="unipc", steps=9, config={**WAN_UNIPC, "disable_corrector": [0, 1]}),
  dict(name="unipc_6_sigma_min", kind="unipc", steps=6, config={**WAN_UNIPC, "final_sigmas_type": "sigma_min"}),
  *(
    dict(
      name=f"euler_{steps}_shift{shift:g}",
      kind="euler",
      steps=steps,
      config=dict(num_train_timesteps=1000, shift=shift),
    )
    for steps in (10, 50)
    for shift in (3.0, 5.0)
  ),
]


def run_case(case, weight, slope, offset, noise):
  if case["kind"] == "unipc":
    scheduler = UniPCMultistepScheduler(**case["config"])
  else:
    scheduler = FlowMatchEulerDiscreteScheduler(**case["config"])
  scheduler.set_timesteps(case["steps"])
  scheduler.set_begin_index(0)  # as WanPipeline does
  sample = torch.from_numpy(noise.copy())
  samples = [sample.numpy().copy()]
  for t in scheduler.timesteps:
    model_output = weight * sample + (t.to(torch.float32) / 1000) * slope + offset
    sample = scheduler.step(model_output, t, sample, return_dict=False)[0]
    samples.append(sample.numpy().copy())
  return {
    "timesteps": scheduler.timesteps.numpy().astype(np.float32),
    "sigmas": scheduler.sigmas.numpy().astype(np.float32),
    "samples": np.stack(samples).astype(np.float32),
  }


def main():
  rng = np.random.default_rng(0)
  weight = rng.uniform(-0.8, 0.8, SHAPE).astype(np.float32)
  slope = rng.normal(size=SHAPE).astype(np.float32)
  offset = rng.normal(size=SHAPE).astype(np.float32)
  noise = rng.normal(size=SHAPE).astype(np.float32)
  tensors = {"weight": weight, "slope": slope, "offset": offset, "noise": noise}
  for case in CASES:
    result = run_case(case, torch.from_numpy(weight), torch.from_numpy(slope), torch.from_numpy(offset), noise)
    tensors.update({f"{case['name']}/{key}": value for key, value in result.items()})
  os.makedirs(OUT, exist_ok=True)
  save_file(tensors, os.path.join(OUT, "trajectories.safetensors"))
  import diffusers  # noqa: PLC0415

  with open(os.path.join(OUT, "cases.json"), "w") as f:
    json.dump({"diffusers_version": diffusers.__version__, "cases": CASES}, f, indent=2)
    f.write("\n")
  print(f"wrote {len(CASES)} cases to {os.path.abspath(OUT)}")


if __name__ == "__main__":
  main()
