import os

# CPU test time is mostly XLA compilation; cheap code generation nearly halves it and changes no result the
# tests assert (they compare against references with tolerances, or two runs under the same flags).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

# Run CPU computations on the calling thread. The Mosaic GPU interpreter runs each simulated warpgroup as a
# computation that blocks in barrier callbacks; dispatched asynchronously, those share XLA's CPU worker pool (one
# thread per core), and on a 2-core machine blocked warpgroups can hold every worker while the warpgroup that
# would release them waits for one: the test hangs. Inline, each warpgroup blocks only its own thread. (A flag,
# not read from the environment: set before the CPU client exists; subprocesses the tests start keep the default.)
jax.config.update("jax_cpu_enable_async_dispatch", False)


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
