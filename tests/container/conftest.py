"""The container test runs only when asked for (`make test-deploy`, or `pytest -m container tests/container`):
it needs root podman and the built CPU image, and takes minutes. Otherwise its tests are deselected, not skipped.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "container: runs the built image under KubeRay's pod contract (make test-deploy)")


def pytest_collection_modifyitems(config, items):
    if "container" in (config.option.markexpr or ""):
        return
    ours = [item for item in items if HERE in Path(str(item.fspath)).parents]
    if ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if item not in ours]
