"""Tests run on 8 simulated CPU devices; nothing is downloaded, nothing is written outside tmp."""

import os
import tempfile

from tiny import xla_flags  # imports no jax, so the flags below still come first

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# wandb's console capture wraps sys.stdout/stderr; inside pytest it wraps the
# capture streams and leaves them closed for the tests that follow.
os.environ.setdefault("WANDB_CONSOLE", "off")
_wandb_home = tempfile.mkdtemp(prefix="wandb-home-")
for _var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_DIR"):
    os.environ.setdefault(_var, _wandb_home)
os.environ.pop("WANDB_API_KEY", None)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"


def pytest_collection_modifyitems(items):
    # The minutes-long end-to-end runs first: under `pytest -n 2` a long test that starts
    # last keeps one worker busy after the other has finished.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
