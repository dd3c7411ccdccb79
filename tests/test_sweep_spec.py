import pytest
import yaml

from shared.config import ConfigError
from shared.sweep import cell_id, load_sweep


def test_example_sweep_expands_to_validated_cells():
    spec, cells = load_sweep("configs/sweep-demo.yaml")
    assert len(cells) == 4 and len({c.id for c in cells}) == 4
    assert {c.config.generate.targets for c in cells} == {"answer", "answer_motivation"}
    assert {c.config.sampling.seed for c in cells} == {0, 1}
    assert all(c.config.name.startswith("sweep-demo-") for c in cells)
    # stable ids: the same overrides give the same id, in any key order
    assert cell_id({"a": 1, "b": "x"}) == cell_id({"b": "x", "a": 1})


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"sampling.temprature": [0.5]}, "temprature"),
        ({"sampling.temperature": [-1]}, "sampling.temperature"),
        ({"sampling.temperature": []}, "at least one value"),
        ({}, "at least one key"),
        ({"sampling.seed": list(range(100))}, "max_cells"),
    ],
)
def test_bad_sweeps(tmp_path, grid, message):
    f = tmp_path / "s.yaml"
    base = tmp_path / "base.yaml"
    base.write_text("models: {teacher: {model: a}, student: {model: b}}\n")
    f.write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", "grid": grid}))
    with pytest.raises(ConfigError) as e:
        load_sweep(f)
    assert message in str(e.value)


def test_long_cell_ids_keep_their_hash():
    """Two cells whose readable parts agree for 120 characters still get different ids and run folders."""
    long = "x" * 200
    a, b = cell_id({"k": long + "a"}), cell_id({"k": long + "b"})
    assert a != b and len(a) <= 100 and len(b) <= 100
