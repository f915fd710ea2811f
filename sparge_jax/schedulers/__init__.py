"""Flow-matching samplers as pure, jittable steps: UniPC multistep (Wan2.1's) and Euler.

    scheduler = load_scheduler("Wan2.1-T2V-1.3B-Diffusers/scheduler")     # or UniPCMultistep(flow_shift=3.0)
    timesteps, sigmas = scheduler.set_timesteps(50)
    state = scheduler.init_state(timesteps, sigmas, noise)
    sample = noise
    for _ in range(50):                                                 # one jitted step, reused
      sample, state = scheduler.step(state, velocity(sample, state.timestep), sample)

Each equals the diffusers scheduler of the same name and options, step for step. The model predicts the
flow velocity; sigma runs from 1 (noise) to 0 (data); the model's timestep is sigma * 1000.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from sparge_jax.schedulers.euler import EulerState, FlowMatchEuler
from sparge_jax.schedulers.unipc import UniPCMultistep, UniPCState

Scheduler = UniPCMultistep | FlowMatchEuler
CONFIG_NAME = "scheduler_config.json"

__all__ = [
  "EulerState",
  "FlowMatchEuler",
  "Scheduler",
  "UniPCMultistep",
  "UniPCState",
  "from_config",
  "load_scheduler",
  "with_shift",
]

# diffusers fields that are ours, fields that must hold a given value (what we implement), and fields that
# have no effect with flow sigmas.
_UNIPC_FIELDS = tuple(f.name for f in dataclasses.fields(UniPCMultistep))
_UNIPC_REQUIRED = {
  "prediction_type": "flow_prediction",
  "use_flow_sigmas": True,
  "predict_x0": True,
  "thresholding": False,
  "use_karras_sigmas": False,
  "use_exponential_sigmas": False,
  "use_beta_sigmas": False,
  "use_dynamic_shifting": False,
  "solver_p": None,
  "shift_terminal": None,
}
_UNIPC_IGNORED = (
  "beta_start",
  "beta_end",
  "beta_schedule",
  "trained_betas",
  "dynamic_thresholding_ratio",
  "sample_max_value",
  "timestep_spacing",
  "steps_offset",
  "rescale_betas_zero_snr",
  "time_shift_type",
  "sigma_min",
  "sigma_max",
)
_EULER_FIELDS = tuple(f.name for f in dataclasses.fields(FlowMatchEuler))
_EULER_REQUIRED = {
  "use_dynamic_shifting": False,
  "invert_sigmas": False,
  "shift_terminal": None,
  "use_karras_sigmas": False,
  "use_exponential_sigmas": False,
  "use_beta_sigmas": False,
  "stochastic_sampling": False,
}
_EULER_IGNORED = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")
_CLASSES = {
  "UniPCMultistepScheduler": (UniPCMultistep, _UNIPC_FIELDS, _UNIPC_REQUIRED, _UNIPC_IGNORED),
  "FlowMatchEulerDiscreteScheduler": (FlowMatchEuler, _EULER_FIELDS, _EULER_REQUIRED, _EULER_IGNORED),
}


def from_config(fields: dict) -> Scheduler:
  """The scheduler a diffusers `scheduler_config.json` describes (its `_class_name` and options).

  Options this package does not implement (e.g. Karras sigmas, thresholding, epsilon prediction) raise a
  ValueError naming them; options without effect on flow sigmas are ignored.
  """
  name = fields.get("_class_name")
  if name not in _CLASSES:
    raise ValueError(f"scheduler _class_name must be one of {sorted(_CLASSES)}, got {name!r}")
  cls, own, required, ignored = _CLASSES[name]
  unknown = sorted(k for k in fields if not k.startswith("_") and k not in (*own, *required, *ignored))
  if unknown:
    raise ValueError(f"{name}: unknown options {unknown}")
  # Falsy stands for off (diffusers tests `if shift_terminal:`; configs write null, false or []).
  unsupported = {
    k: fields[k]
    for k, value in required.items()
    if k in fields and fields[k] != value and not (value in (None, False) and not fields[k])
  }
  if unsupported:
    raise ValueError(f"{name}: unsupported options {unsupported}; supported: {required}")
  options = {k: fields[k] for k in own if k in fields}
  if "disable_corrector" in options:
    options["disable_corrector"] = tuple(options["disable_corrector"] or ())
  return cls(**options)


def load_scheduler(folder: str | os.PathLike) -> Scheduler:
  """`from_config` of `folder/scheduler_config.json` (a diffusers `scheduler/` folder)."""
  path = Path(folder) / CONFIG_NAME
  if not path.is_file():
    raise ValueError(f"{folder} is not a diffusers scheduler folder (no {CONFIG_NAME})")
  try:
    fields = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(fields, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return from_config(fields)


def with_shift(scheduler: Scheduler, shift: float) -> Scheduler:
  """A copy of `scheduler` with its time shift (UniPC's `flow_shift`, Euler's `shift`) set to `shift`."""
  if isinstance(scheduler, UniPCMultistep):
    return dataclasses.replace(scheduler, flow_shift=shift)
  return dataclasses.replace(scheduler, shift=shift)
