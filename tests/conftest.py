import os


# The suite runs on the CPU backend wherever it is run, unless JAX_PLATFORMS says
# otherwise: its sharding tests need the 8 simulated host devices below, and on a
# one-GPU machine JAX's default backend would offer one device.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA reads its flags when JAX creates a backend, so they are set before the first
# `import jax` of the session:
# - 8 simulated CPU devices for the sharding tests;
# - no LLVM optimisation of the compiled kernels. The suite's time is mostly XLA:CPU
#   compiling small programs, and LLVM's passes are about half of that. They change how
#   fast a kernel runs and the last bit of some results, which no test may depend on.
#   The examples (run in subprocesses without these flags) compile with XLA's
#   defaults, as `make bench` does.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh deterministic key on every call."""
    counter = [0]

    def _getkey():
        counter[0] += 1
        return jr.PRNGKey(counter[0])

    return _getkey
