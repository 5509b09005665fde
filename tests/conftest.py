import os


# 8 simulated CPU devices for the sharding tests; must happen before JAX creates a
# backend, so it is done before the first `import jax` of the session.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

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
