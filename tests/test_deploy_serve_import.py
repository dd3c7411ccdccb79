"""The RayService's serve config imports and builds in the project.

The chart's RayService carries a Ray Serve config (serveConfigV2) whose application is the project's
builder (`services.teacher.app:build_app`) called with `{"config_data": <the serving part of the
experiment>}`. KubeRay hands it to Ray Serve in the cluster; here it is imported and called the same
way and must return a `ray.serve.Application` -- without starting Ray.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "helm" / "tomtransfer"


def _load_chartcheck():
    spec = importlib.util.spec_from_file_location("chartcheck", REPO / "deploy" / "scripts" / "chartcheck.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("chartcheck", module)
    spec.loader.exec_module(module)
    return module


cc = _load_chartcheck()


@pytest.fixture(scope="session")
def helm() -> str:
    return cc.helm_binary()


# The GPU values build the same app with the vLLM engine, which needs a GPU image to import.
@pytest.mark.parametrize("values", [[], [CHART / "values-cpu.yaml"]], ids=["default", "cpu"])
def test_rayservice_serve_config_imports_and_builds(helm, values):
    import ray
    from ray.serve import Application

    objs = cc.render(values)
    (rayservice,) = [o for o in objs if o["kind"] == "RayService"]
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])

    apps = serve_config["applications"]
    assert apps, "serveConfigV2 has no application"
    for app in apps:
        # the serving part of the experiment travels inline (Serve applies a change in place)
        args = dict(app.get("args") or {})
        assert set(args) == {"config_data"}

        module_name, _, attr = app["import_path"].partition(":")
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        builder = getattr(importlib.import_module(module_name), attr)
        built = builder if isinstance(builder, Application) else builder(args)

        assert isinstance(built, Application), f"{app['import_path']} returned {type(built).__name__}"
    assert not ray.is_initialized(), "building the app must not start Ray"
