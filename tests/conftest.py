"""Shared pytest configuration.

* Marker ``gpu`` (declared in setup.cfg): tests that need a CUDA device;
  skipped, with the reason, when cupy is missing or sees no device.
* Hypothesis profiles: ``dev`` (25 examples, the default: the README's
  command) and ``ci`` (200 examples, what .ci/run sets), picked by the
  environment variable HYPOTHESIS_PROFILE.
* The report header names the cupyflash the tests import (the installed one,
  see tests/test_install.py).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import cupyflash

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_report_header(config):
    return f"cupyflash {cupyflash.__version__} from {os.path.dirname(cupyflash.__file__)}"


_GPU_STATUS = None


def gpu_status():
    """(available, reason) for the gpu marker, computed once."""
    global _GPU_STATUS
    if _GPU_STATUS is None:
        try:
            import cupy

            n = cupy.cuda.runtime.getDeviceCount()
            _GPU_STATUS = (n > 0, "cupy sees no CUDA device" if n == 0 else "")
        except ImportError as exc:
            _GPU_STATUS = (False, f"cupy is not installed ({exc})")
        except Exception as exc:  # no driver, no device, ...
            _GPU_STATUS = (False, f"no usable CUDA device: {type(exc).__name__}: {exc}")
    return _GPU_STATUS


def _spread_long_running(config, items):
    """The long-running tests first, each at the head of another worker's share of the collection: xdist's
    worksteal hands each worker a contiguous section, and a worker cannot give up the test it holds next, so
    two long tests in one section run one after the other."""
    long = [item for item in items if item.get_closest_marker("long_running") is not None]
    ordered = [item for item in items if item.get_closest_marker("long_running") is None]
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    section = len(items) // workers
    for k, item in enumerate(long):
        ordered.insert(k * section if k < workers else k, item)
    items[:] = ordered


def pytest_collection_modifyitems(config, items):
    _spread_long_running(config, items)
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    ok, reason = gpu_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason}")
    for item in gpu_items:
        item.add_marker(skip)
