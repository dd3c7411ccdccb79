import pytest
import yaml

from tomtransfer.shared.config import ConfigError
from tomtransfer.shared.sweep import cell_id, load_sweep


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


def test_cells_get_their_own_adapter_name_and_share_serving_when_they_can(tmp_path):
    """Cells that differ only in what the app is not built from share one serving app (serving_group), and each
    serves its adapter under its own name there; a grid over the student splits the cells into groups."""
    from tomtransfer.services.pipeline.sweep import serving_group

    (tmp_path / "base.yaml").write_text("models: {teacher: {model: a}, student: {model: b}}\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"name": "s", "base": "base.yaml", "max_concurrent": 2,
         "grid": {"sampling.seed": [0, 1], "training.learning_rate": [1e-4, 2e-4]}}))
    spec, cells = load_sweep(tmp_path / "s.yaml")
    assert spec.max_concurrent == 2
    names = [c.config.training.adapter_name for c in cells]
    assert len(set(names)) == 4 and all(n.startswith("tom-") and n[4:] in c.id for n, c in zip(names, cells))
    assert len({serving_group(c.config) for c in cells}) == 1
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(
        {"name": "m", "base": "base.yaml", "grid": {"models.student.model": ["b", "c"], "sampling.seed": [0, 1]}}))
    _, cells = load_sweep(tmp_path / "m.yaml")
    assert len({serving_group(c.config) for c in cells}) == 2


def test_bad_max_concurrent(tmp_path):
    (tmp_path / "base.yaml").write_text("models: {teacher: {model: a}, student: {model: b}}\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"name": "s", "base": "base.yaml", "max_concurrent": 0, "grid": {"sampling.seed": [0]}}))
    with pytest.raises(ConfigError, match="max_concurrent"):
        load_sweep(tmp_path / "s.yaml")


@pytest.mark.parametrize("base_placebo", [False, True])
def test_placebo_is_a_grid_key(tmp_path, base_placebo):
    """`training.placebo` per cell: a cell with it on evaluates student_placebo beside its real adapter (its adapter
    `<cell adapter>-placebo`), one with it off does not, whatever the base says (the role list is derived per cell)."""
    models = {"teacher": {"model": "a"}, "student": {"model": "b"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"models": models, "training": {"placebo": base_placebo}}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "base": "base.yaml",
                                                     "grid": {"training.placebo": [False, True]}}))
    _, cells = load_sweep(tmp_path / "s.yaml")
    by = {c.config.training.placebo: c.config for c in cells}
    assert "student_placebo" in by[True].evaluate.roles and "student_placebo" not in by[False].evaluate.roles
    from tomtransfer.shared.samples import served_model

    assert served_model("student_placebo", by[True].training.adapter_name) == \
        f"student:{by[True].training.adapter_name}-placebo"
    # a base that names its roles keeps them: asking for the placebo role where it is off is an error
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "models": {"teacher": {"model": "a"}, "student": {"model": "b"}}, "training": {"placebo": True},
        "evaluate": {"roles": ["teacher", "student_base", "student_finetuned", "student_placebo"]}}))
    with pytest.raises(ConfigError, match="student_placebo needs training.placebo"):
        load_sweep(tmp_path / "s.yaml")


def test_objectives_sweep_expands_into_its_cells():
    """configs/sweep-objectives.yaml (issue 22 item 2): sft / distribution / sft+distribution x k = 1, 4, 16, 64
    teacher samples per scenario, 12 cells, each with its placebo control and evaluated on all four families (the
    transfer families: in-sample, new contexts, doubled payoffs, the public-goods game); everything else the demo."""
    from tomtransfer.shared.config import load_config

    spec, cells = load_sweep("configs/sweep-objectives.yaml")
    demo = load_config("configs/demo.yaml")
    assert spec.name == "sweep-objectives" and spec.max_concurrent == 1
    grid = {(c.config.training.objective, c.config.generate.samples) for c in cells}
    assert len(cells) == 12 and grid == {(o, k) for o in ("sft", "distribution", "sft+distribution")
                                         for k in (1, 4, 16, 64)}
    assert len({c.id for c in cells}) == 12 and len({c.config.training.adapter_name for c in cells}) == 12
    for c in cells:
        cfg = c.config
        assert set(c.overrides) == {"training.objective", "generate.samples"}
        assert cfg.training.placebo and "student_placebo" in cfg.evaluate.roles
        assert cfg.evaluate.families == ["in_sample", "oos_context", "oos_game", "pgg"]
        assert cfg.generate.families == ["in_sample"] and cfg.generate.instruction == "answer_motivation"
        assert cfg.models == demo.models and cfg.sampling == demo.sampling
        assert cfg.evaluate.estimator == "exact" and cfg.evaluate.protocol == "paper"
        assert str(cfg.output_dir).endswith("sweep-objectives") and cfg.name.startswith("sweep-objectives-")
