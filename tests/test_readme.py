"""The README's usage example runs as written on a CPU, in under a minute."""

import os
import re
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Address space for the example's process: an example sized for a GPU fails here instead of taking the machine.
MEMORY_LIMIT = 12 << 30


def readme_example() -> str:
  """The first ```python block of README.md."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    match = re.search(r"^```python\n(.*?)^```", f.read(), re.S | re.M)
  assert match, "README.md has no ```python block"
  return match.group(1)


def _limit_memory():
  resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_readme_usage_example_runs_on_a_cpu_in_under_a_minute():
  code = readme_example()
  # A fresh interpreter, as a reader would run it: imports and compilation count.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  start = time.perf_counter()
  try:
    result = subprocess.run(
      [sys.executable, "-c", code],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=90,
      preexec_fn=_limit_memory,
    )
  except subprocess.TimeoutExpired:
    raise AssertionError(f"the README example ran past 90 s on a CPU:\n{code}") from None
  seconds = time.perf_counter() - start
  assert result.returncode == 0, f"the README example failed:\n{code}\n{result.stderr[-5000:]}"
  assert seconds < 60, f"the README example took {seconds:.0f} s on a CPU"
