"""seerlike: self-supervised pretraining of vision backbones on uncurated image corpora."""

__version__ = "0.1.0"
