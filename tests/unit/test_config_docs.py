"""Every config key a user can set is documented, and docs/config.md is current."""

from pathlib import Path

import pytest

from seerlike import config, recipes
from seerlike.recipes import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(cli.TOP_LEVEL))
def test_every_field_has_a_one_line_doc(name):
    assert config.undocumented(cli._cls(cli.TOP_LEVEL[name][0])) == []


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_round_trips_through_yaml(name, tmp_path):
    cfg = recipes.get(name)
    assert config.load(config.dump(cfg, tmp_path / "c.yaml")) == cfg


def test_docs_config_md_is_generated_from_the_current_configs():
    assert (ROOT / "docs" / "config.md").read_text() == cli.markdown_reference(), \
        "docs/config.md is stale: run `seerlike config --reference-md docs/config.md`"


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(config.ConfigError, match="known recipes: .*tiny_swav"):
        recipes.get("tiny_swa")


def test_the_reference_of_a_recipe_prints_its_values(capsys):
    from seerlike.cli import main

    assert main(["config", "--recipe", "tiny_swav", "--reference", "optim.lr=0.3"]) == 0
    rows = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()}
    assert rows["model.name"] == "'resnet10_cifar'" and rows["optim.lr"] == "0.3"
    assert rows["method.name"] == "'swav'" and rows["data.augment.views"].startswith("[{'count':")


def test_the_class_reference_shows_what_a_default_factory_makes():
    from seerlike.eval.linear import LowShotConfig

    rows = {key: value for key, _, value, _ in config.reference(LowShotConfig)}
    probe = LowShotConfig().probe
    assert rows["probe.epochs"] == repr(probe.epochs) == "200" and rows["probe.batch_size"] == "64"
    assert rows["probe.weight_decay"] == repr(probe.weight_decay)
