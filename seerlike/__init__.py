"""seerlike: self-supervised pretraining of vision backbones on uncurated image corpora.

The Python API (seerlike.api) is importable from here: ``seerlike.pretrain(...)``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the API imports torch: load it on first use so `seerlike --help` and the config tools stay fast
    if name in ("pretrain", "PretrainResult"):
        from seerlike import api

        return getattr(api, name)
    raise AttributeError(f"module 'seerlike' has no attribute {name!r}")
