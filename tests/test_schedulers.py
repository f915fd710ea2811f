"""Flow-matching schedulers against diffusers' own runs (tests/fixtures/schedulers, from
scripts/make_scheduler_fixture.py): whole sampling runs, a jitted step compiled once, config loading."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from sparge_jax import schedulers

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "schedulers"
CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"]
TENSORS = load_file(FIXTURE / "trajectories.safetensors")


def _scheduler(case):
  name = "UniPCMultistepScheduler" if case["kind"] == "unipc" else "FlowMatchEulerDiscreteScheduler"
  return schedulers.from_config({"_class_name": name, **case["config"]})


def _model(sample, timestep):
  """The fixture's deterministic "model": elementwise affine in the sample and the timestep."""
  return TENSORS["weight"] * sample + (timestep / 1000) * TENSORS["slope"] + TENSORS["offset"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_whole_run_matches_diffusers(case):
  scheduler = _scheduler(case)
  expected = TENSORS[f"{case['name']}/samples"]
  timesteps, sigmas = scheduler.set_timesteps(case["steps"])
  np.testing.assert_array_equal(timesteps, TENSORS[f"{case['name']}/timesteps"])
  np.testing.assert_array_equal(sigmas, TENSORS[f"{case['name']}/sigmas"])

  traces = []

  @jax.jit
  def step(state, sample):
    traces.append(None)
    return scheduler.step(state, _model(sample, state.timestep), sample)

  sample = jnp.asarray(TENSORS["noise"])
  state = scheduler.init_state(timesteps, sigmas, sample)
  errors = []
  for i in range(case["steps"]):
    sample, state = step(state, sample)
    errors.append(float(jnp.max(jnp.abs(sample - expected[i + 1]))))
  assert len(traces) == 1  # one compiled step for the whole run
  assert int(state.step_index) == case["steps"]
  assert max(errors) <= 1e-5, f"max abs error per step: {errors}"
  assert np.abs(expected[-1] - expected[0]).max() > 0.5  # the run moves the sample


def test_wan_default_config_is_unipc_flow_shift_3():
  fields = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
  }
  assert schedulers.from_config(fields) == schedulers.UniPCMultistep(flow_shift=3.0)
  assert schedulers.with_shift(schedulers.from_config(fields), 5.0).flow_shift == 5.0
  assert schedulers.with_shift(schedulers.FlowMatchEuler(), 5.0).shift == 5.0


def test_load_scheduler_reads_the_folder(tmp_path):
  (tmp_path / "scheduler_config.json").write_text(
    json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0, "base_shift": 0.5})
  )
  assert schedulers.load_scheduler(tmp_path) == schedulers.FlowMatchEuler(shift=5.0)
  with pytest.raises(ValueError, match="no scheduler_config.json"):
    schedulers.load_scheduler(tmp_path / "missing")


@pytest.mark.parametrize(
  "fields, match",
  [
    ({"_class_name": "DDIMScheduler"}, "_class_name"),
    ({"_class_name": "UniPCMultistepScheduler", "prediction_type": "epsilon"}, "prediction_type"),
    ({"_class_name": "UniPCMultistepScheduler", "use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"_class_name": "UniPCMultistepScheduler", "shift_terminal": 0.1}, "shift_terminal"),
    ({"_class_name": "UniPCMultistepScheduler", "frobnicate": 1}, "frobnicate"),
    ({"_class_name": "UniPCMultistepScheduler", "solver_type": "heun"}, "solver_type"),
    ({"_class_name": "UniPCMultistepScheduler", "flow_shift": -1.0}, "flow_shift"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True}, "stochastic_sampling"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 0}, "shift"),
  ],
)
def test_unsupported_or_bad_options_are_named(fields, match):
  with pytest.raises(ValueError, match=match):
    schedulers.from_config(fields)


@pytest.mark.parametrize("scheduler", [schedulers.UniPCMultistep(), schedulers.FlowMatchEuler()])
def test_bad_arguments_raise_before_work(scheduler):
  with pytest.raises(ValueError, match="num_steps"):
    scheduler.set_timesteps(0)
  timesteps, sigmas = scheduler.set_timesteps(4)
  with pytest.raises(ValueError, match="timesteps"):
    scheduler.init_state(timesteps[:-1], sigmas, jnp.zeros(3))
  state = scheduler.init_state(timesteps, sigmas, jnp.zeros(3))
  with pytest.raises(ValueError, match="shape"):
    scheduler.step(state, jnp.zeros(4), jnp.zeros(3))
