"""The package: one import namespace (`tomtransfer.…`), whatever folders sit beside the caller.

The card keeps the folders `shared/` and `services/`; pyproject's package-dir mapping installs them as
`tomtransfer.shared` and `tomtransfer.services`. Before, the wheel put top-level packages named `shared` and `services`
into site-packages, and a process started from a directory holding a folder of that name (every checkout here has
`../shared` beside it) merged the two: `build_catalog()` ended in a MultiplexedPath TypeError.
"""
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"tomtransfer": "tomtransfer", "tomtransfer.shared": "shared", "tomtransfer.services": "services"}


def _package_folders() -> set[str]:
    names = set()
    for top, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                names.add(".".join([top, *rel.parts]))
    return names


def test_pyproject_lists_every_package_folder_under_the_mapping():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == MAPPED
    assert set(tool["packages"]) == _package_folders()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tomtransfer": "tomtransfer.services.cli:main"}


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources (no build/ in the checkout), unpacked as site-packages."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in MAPPED.values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, cwd=src)
    (wheel,) = dist.glob("tomtransfer-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_the_wheel_installs_one_top_level_package_with_its_data(wheel_dir):
    tops = {p.name for p in wheel_dir.iterdir() if not p.name.endswith(".dist-info")}
    assert tops == {"tomtransfer"}
    assert (wheel_dir / "tomtransfer" / "shared" / "data" / "contexts" / "IR.txt").is_file()
    (info,) = wheel_dir.glob("tomtransfer-*.dist-info")
    assert "tomtransfer = tomtransfer.services.cli:main" in (info / "entry_points.txt").read_text()


def test_the_installed_wheel_works_beside_folders_named_shared_and_services(wheel_dir, tmp_path):
    # the foreign folders: regular packages of another project, first on the path (cwd and PYTHONPATH)
    for name in ("shared", "services"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("FOREIGN = True\n")
    env = {"PYTHONPATH": f"{tmp_path}:{wheel_dir}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    code = (
        "import shared, services, tomtransfer.shared.scenarios as s, tomtransfer.services.cli\n"
        "assert shared.FOREIGN and services.FOREIGN\n"
        f"assert s.__file__.startswith({str(wheel_dir)!r}), s.__file__\n"
        "print(len(s.build_catalog().scenarios))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 0
    cli = subprocess.run([sys.executable, "-m", "tomtransfer.services.cli", "scenarios", "list"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "scenarios" in cli.stdout


PACKAGES = sorted(n for n in _package_folders())


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_names_its_public_surface(package):
    """`__all__` is the surface: every name resolves, none is also a submodule's name (a submodule imported later
    would replace the lazy attribute), and the package imports none of them eagerly."""
    import importlib
    import pkgutil

    mod = importlib.import_module(package)
    assert (mod.__doc__ or "").strip(), f"{package}: no docstring"
    public = getattr(mod, "__all__", [])
    submodules = {m.name for m in pkgutil.iter_modules(mod.__path__)}
    assert not set(public) & submodules, set(public) & submodules
    for name in public:
        assert getattr(mod, name) is not None


def test_importing_a_package_loads_none_of_its_heavy_dependencies():
    code = ("import sys, tomtransfer.shared, tomtransfer.services.trainer, tomtransfer.services.teacher, "
            "tomtransfer.services.evaluator, tomtransfer.services.pipeline\n"
            "heavy = [m for m in ('torch', 'ray', 'mlflow', 'scipy', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
