"""Recipes: plain functions returning a config. ``RECIPES`` maps ``--recipe NAME`` to them."""

from __future__ import annotations

from typing import Any, Callable

from seerlike.config import ConfigError
from seerlike.recipes import (barlow_twins, byol, clusterfit, colorization, deepcluster_v2, dino, distill, jigsaw,
                              moco_v2, moco_v3, multitask, npid, pirl, relative_position, rotnet, seer, sela, semisup,
                              simclr, simsiam, swav, tiny, vicreg)

RECIPES: dict[str, Callable[[], Any]] = {
    **swav.RECIPES,
    **byol.RECIPES,
    **seer.RECIPES,
    **tiny.RECIPES,
    **clusterfit.RECIPES,
    **distill.RECIPES,
    **simclr.RECIPES,
    **moco_v2.RECIPES,
    **moco_v3.RECIPES,
    **dino.RECIPES,
    **simsiam.RECIPES,
    **barlow_twins.RECIPES,
    **vicreg.RECIPES,
    **rotnet.RECIPES,
    **jigsaw.RECIPES,
    **relative_position.RECIPES,
    **colorization.RECIPES,
    **deepcluster_v2.RECIPES,
    **sela.RECIPES,
    **npid.RECIPES,
    **pirl.RECIPES,
    **multitask.RECIPES,
    **semisup.RECIPES,
}


def get(name: str) -> Any:
    """The config a recipe returns; an unknown name fails listing the known ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()
