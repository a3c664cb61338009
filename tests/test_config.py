"""Config: defaults < YAML < overrides, strict errors, grids, save/load round trip, CLI exit status."""

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from lmlab.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_diff,
    config_to_dict,
    describe,
    load_config,
    load_grid,
    parse_overrides,
    save_config,
)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_then_yaml_then_overrides(tmp_path):
    p = write(tmp_path, """
        name: exp
        model: {dim: 128, n_heads: 8, init: {std: 0.01}, norm_eps: 1e-6}
        data: {seq_len: 64}
    """)
    cfg = load_config(p, ["model.dim=256", "data.batch_size=3"])
    assert cfg.name == "exp"
    assert cfg.model.dim == 256 and cfg.model.n_heads == 8  # override beats YAML, YAML beats default
    assert cfg.model.init.std == 0.01 and cfg.model.init.scheme == Config().model.init.scheme
    assert cfg.data.seq_len == 64 and cfg.data.batch_size == 3
    assert cfg.model.n_layers == ModelConfig().n_layers
    assert cfg.model.norm_eps == 1e-6  # YAML 1.2 float syntax, which plain PyYAML reads as a string


def test_unknown_key_names_full_path_and_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model\.init\.sdt'; did you mean 'model\.init\.std'"):
        load_config(None, ["model.init.sdt=0.1"])
    p = write(tmp_path, "model:\n  n_layer: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.n_layer'; did you mean 'model\.n_layers'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'; valid keys here: 'name'"):
        load_config(None, ["zzz=1"])
    with pytest.raises(ConfigError, match=r"'model\.dim' is not a section"):
        load_config(None, ["model.dim.x=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dim=abc", r"model\.dim: expected int, got 'abc'"),
        ("model.dim=1.5", r"model\.dim: expected int, got 1\.5"),
        ("model.tie_embeddings=1", r"model\.tie_embeddings: expected bool, got 1"),
        ("model.init.scheme=xavier", r"model\.init\.scheme: expected one of 'normal', 'gpt2'"),
        ("data.train_files=3", r"data\.train_files: expected list of str, got 3"),
        ("model.n_kv_heads=two", r"model\.n_kv_heads: expected int or null, got 'two'"),
        ("model=3", r"model: expected a mapping"),
        ("model.dim", r"not of the form dotted\.key=value"),
    ],
)
def test_wrong_types_name_path_expected_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads: n_heads=4 is not a multiple of n_kv_heads=3"):
        load_config(None, ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        load_config(None, ["data.val_fraction=1.5"])


def test_override_value_parsing():
    cfg = load_config(None, ["name=007", "model.init.std=1", "model.n_kv_heads=null", "model.rope_theta=5e5",
                             "data.train_files=[a.txt, 'b c.txt']", "data.separator=", "model.init.seed=4"])
    assert cfg.name == "007"  # string fields keep the text as written
    assert cfg.model.init.std == 1.0 and isinstance(cfg.model.init.std, float)  # int widens to float
    assert cfg.model.n_kv_heads is None
    assert cfg.model.rope_theta == 500000.0
    assert cfg.data.train_files == ["a.txt", "b c.txt"]
    assert cfg.data.separator == ""
    assert parse_overrides(["model.dim=64"]) == {"model": {"dim": 64}}


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "model:\n  dim: 64\n   n_layers: [\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_config(p)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_grid_cartesian_product_and_names(tmp_path):
    p = write(tmp_path, """
        name: sweep
        model: {dim: 64}
        grid:
          model: {n_layers: [1, 2]}
          seed: [0, 1, 2]
          data.packing: [true, false]
    """)
    runs = load_grid(p)
    assert len(runs) == 12
    assert [r.name for r in runs[:3]] == [
        "sweep/n_layers=1_seed=0_packing=true",
        "sweep/n_layers=1_seed=0_packing=false",
        "sweep/n_layers=1_seed=1_packing=true",
    ]
    assert {(r.model.n_layers, r.seed, r.data.packing) for r in runs} == {
        (n, s, k) for n in (1, 2) for s in (0, 1, 2) for k in (True, False)}
    assert all(r.model.dim == 64 for r in runs)
    assert [r.name for r in load_grid(p)] == [r.name for r in runs]  # deterministic
    # CLI overrides apply to every point and win over the grid
    fixed = load_grid(p, ["seed=9"])
    assert {r.seed for r in fixed} == {9}
    # ... and the axis they fix is gone: one run per remaining point, named without it
    assert [r.name for r in fixed] == ["sweep/n_layers=1_packing=true", "sweep/n_layers=1_packing=false",
                                       "sweep/n_layers=2_packing=true", "sweep/n_layers=2_packing=false"]
    # an explicit name renames the grid's folder; the points keep their suffixes
    renamed = load_grid(p, ["name=x", "seed=9"])
    assert [r.name for r in renamed] == ["x/" + r.name.split("/", 1)[1] for r in fixed]
    assert load_grid(p, ["model.n_layers=3", "seed=1", "data.packing=false"])[0].name == "sweep"


def test_grid_labels_disambiguate_and_errors(tmp_path):
    p = write(tmp_path, "grid: {model.init.seed: [1, 2], seed: [3]}\n")
    assert [r.name for r in load_grid(p)] == ["run/model.init.seed=1_seed=3", "run/model.init.seed=2_seed=3"]
    with pytest.raises(ConfigError, match=r"grid\.seed: the list of values is empty"):
        load_grid(write(tmp_path, "grid: {seed: []}\n", "e.yaml"))
    with pytest.raises(ConfigError, match=r"unknown key 'model\.dimm'"):
        load_grid(write(tmp_path, "grid: {model.dimm: [1]}\n", "u.yaml"))
    with pytest.raises(ConfigError, match=r"grid point dim=100: model\.dim"):
        load_grid(write(tmp_path, "grid: {model.dim: [64, 100]}\n", "v.yaml"))
    with pytest.raises(ConfigError, match="has a grid of 2 runs"):
        load_config(write(tmp_path, "grid: {seed: [1, 2]}\n", "g.yaml"))


def test_save_and_reload_round_trip_exact(tmp_path):
    cfg = load_config(None, ["model.init.std=0.0123456789", "model.norm_eps=1e-6", "data.separator=\\n\\n",
                             "data.train_files=[x.txt]", "name=a/b", "model.rope_theta=1234567.891"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    back = load_config(path)
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    grid_cfg = load_grid(write(tmp_path, "grid: {model.dim: [32, 64]}\n"))[1]
    assert load_config(save_config(grid_cfg, tmp_path / "g")) == grid_cfg


def test_every_field_has_a_help_line():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
                walk(getattr(cls(), f.name).__class__)
    walk(Config)
    lines = describe()
    assert any(line.startswith("model.init.std (float, default 0.02)") for line in lines)


def test_cli_config_errors_exit_2_with_one_line(tmp_path):
    p = write(tmp_path, "model: {dim: 64, n_heads: 4}\n")
    ok = subprocess.run([sys.executable, "-m", "lmlab.cli", "config", str(p), "seed=5"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "seed: 5" in ok.stdout and "dim: 64" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lmlab.cli", "config", str(p), "model.dimm=1"], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["config error: unknown key 'model.dimm'; did you mean 'model.dim'?"]
    assert "Traceback" not in bad.stderr


def test_references_tags_and_grid(tmp_path):
    """``${dotted.key}`` resolves after the grid point and overrides; tags take dotted grid keys; ``$${`` is literal
    and survives a save/load round trip."""
    path = tmp_path / "g.yaml"
    path.write_text(
        "name: mem\n"
        "tags: {mode: tool, people: 64}\n"
        "data: {train_files: ['d/p${tags.people}/${tags.mode}.jsonl', 'lit$${x}', '${name}']}\n"
        "grid: {tags.people: [64, 256]}\n"
    )
    cfgs = load_grid(path, ["tags.mode=weight"])
    assert [c.name for c in cfgs] == ["mem/people=64", "mem/people=256"]
    assert cfgs[1].data.train_files == ["d/p256/weight.jsonl", "lit${x}", "mem/people=256"]
    assert cfgs[1].tags == {"mode": "weight", "people": 256}
    save_config(cfgs[1], tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.yaml") == cfgs[1]


@pytest.mark.parametrize("text, match", [
    ("data: {train_files: ['${tags.nope}']}\n", "unknown key"),
    ("data: {train_files: ['${model}']}\n", "section"),
    ("name: '${tags.a}'\ntags: {a: '${tags.b}', b: '${tags.a}'}\n", "cycle"),
])
def test_reference_errors(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_grid_bundle_axis(tmp_path):
    """A grid key that is not a config key, with mappings as values, sets several keys together."""
    path = tmp_path / "g.yaml"
    path.write_text("name: g\ngrid:\n"
                    "  size: [{model.dim: 64, model.n_layers: 2}, {model.dim: 128, model.n_layers: 4}]\n"
                    "  seed: [0, 1]\n")
    cfgs = load_grid(path)
    assert [c.name for c in cfgs] == ["g/size=dim64+n_layers2_seed=0", "g/size=dim64+n_layers2_seed=1",
                                      "g/size=dim128+n_layers4_seed=0", "g/size=dim128+n_layers4_seed=1"]
    assert [(c.model.dim, c.model.n_layers, c.seed) for c in cfgs] == [(64, 2, 0), (64, 2, 1), (128, 4, 0), (128, 4, 1)]
    # a bundle whose keys the command line all sets is one run; one it sets only partly still separates points
    assert [c.name for c in load_grid(path, ["model.dim=96", "model.n_layers=3"])] == ["g/seed=0", "g/seed=1"]
    part = load_grid(path, ["model.dim=96"])
    assert [c.name for c in part] == ["g/size=n_layers2_seed=0", "g/size=n_layers2_seed=1",
                                      "g/size=n_layers4_seed=0", "g/size=n_layers4_seed=1"]
    assert {c.model.dim for c in part} == {96}
    # a bundle axis named like a key each bundle sets to its own value is labelled by that value; the command line
    # setting that key keeps the bundle that has its value (and its other settings), and the name drops the axis
    path.write_text("name: g\ntrain: {steps: 10}\ngrid:\n"
                    "  mode: [{tags.mode: tool, train.steps: 35, optim.lr: 0.01}, {tags.mode: weight}]\n"
                    "  seed: [0, 1]\n")
    cfgs = load_grid(path)
    assert [c.name for c in cfgs] == ["g/mode=tool_seed=0", "g/mode=tool_seed=1", "g/mode=weight_seed=0",
                                      "g/mode=weight_seed=1"]
    assert [(c.tags["mode"], c.train.steps) for c in cfgs] == [("tool", 35), ("tool", 35), ("weight", 10),
                                                               ("weight", 10)]
    tool = load_grid(path, ["tags.mode=tool"])
    assert [(c.name, c.tags["mode"], c.train.steps, c.optim.lr) for c in tool] == [
        ("g/seed=0", "tool", 35, 0.01), ("g/seed=1", "tool", 35, 0.01)]
    weight = load_grid(path, ["tags.mode=weight", "seed=3"])
    assert [(c.name, c.train.steps, c.seed) for c in weight] == [("g", 10, 3)]
    assert weight[0].optim.lr != 0.01
    # the command line still wins over the chosen bundle; with a value no bundle has, the keys it sets go from
    # every bundle (here one is left empty, so the axis goes)
    assert [c.train.steps for c in load_grid(path, ["tags.mode=tool", "train.steps=7"])] == [7, 7]
    other = load_grid(path, ["tags.mode=other", "seed=0"])
    assert [(c.name, c.tags["mode"], c.train.steps) for c in other] == [("g", "other", 10)]
    # two bundles with the same value of the axis's key keep the full label
    path.write_text("name: g\ngrid:\n  mode: [{tags.mode: tool, seed: 1}, {tags.mode: tool, seed: 2}]\n")
    assert [c.name for c in load_grid(path)] == ["g/mode=modetool+seed1", "g/mode=modetool+seed2"]
    path.write_text("grid:\n  size: [{model.dimm: 64}]\n")
    with pytest.raises(ConfigError, match="model.dimm"):
        load_grid(path)
    path.write_text("grid:\n  size: [1, 2]\n")
    with pytest.raises(ConfigError, match="unknown key 'size'"):
        load_grid(path)


def test_config_diff_lists_changed_added_and_removed_keys_sorted():
    old = {"model": {"dim": 64, "n_layers": 2}, "optim": {"lr": 0.003}, "name": "a", "gone": 1}
    new = {"model": {"dim": 128, "n_layers": 2}, "optim": {"lr": 0.003, "wd": 0.1}, "name": "a"}
    assert config_diff(old, new) == ["gone: 1 -> None", "model.dim: 64 -> 128", "optim.wd: None -> 0.1"]
    assert config_diff(new, new) == []
    base = load_config()
    assert config_diff(config_to_dict(base), config_to_dict(load_config(None, ["model.dim=96"]))) == [
        f"model.dim: {base.model.dim!r} -> 96"]
