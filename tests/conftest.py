"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never reach the network from tests (TFDS GCS lookups etc.).
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".tfds"))
os.environ.setdefault("NO_GCE_CHECK", "true")

# The programs' XLA:CPU options, so tests compile what users run.
from diffusion_jax.runtime.xla_flags import set_cpu_flags  # noqa: E402

set_cpu_flags()


@pytest.fixture(autouse=True)
def _fresh_trace_counts():
    """chex's `assert_max_traces` counts per process, keyed on the function: start every test from zero, so
    two tests counting the same function (and sharing an xdist worker) do not add up."""
    import chex

    chex.clear_trace_counter()
