"""Number-for-number parity with diffusers' WanTransformer3DModel (fixtures from scripts/make_wan_fixture.py)."""

from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sparge_jax.models.wan import load_diffusers

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("case", ["wan_tiny", "wan_tiny_patch222"])
def test_matches_diffusers_in_float32(case):
  model = load_diffusers(FIXTURES / case / "transformer")
  io = load_file(FIXTURES / case / "io.safetensors")
  channels_last = (0, 2, 3, 4, 1)  # diffusers is [batch, channels, frames, height, width]
  out = nnx.jit(lambda model, x, t, c: model(x, t, c))(model, io["x"].transpose(channels_last), io["t"], io["context"])
  expected = io["out"].transpose(channels_last)
  assert out.shape == expected.shape
  relative = float(np.abs(np.asarray(out) - expected).max() / np.abs(expected).max())
  assert relative < 1e-4, f"max |jax - diffusers| / max |diffusers| = {relative:.2e}"
