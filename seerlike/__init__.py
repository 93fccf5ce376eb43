"""seerlike: self-supervised pretraining of vision backbones on uncurated image corpora.

The Python API (seerlike.api, docs/api.md)::

    seerlike.ingest(sources, out=...)            -> IngestResult  (dataset, manifest, summary)
    seerlike.pretrain(data=..., out=..., recipe=..., overrides={...})
                                                 -> PretrainResult (run_dir, checkpoint, metrics)
    seerlike.extract(model, data, out, ...)      -> ExtractResult  (features dir, dim, samples)
    seerlike.evaluate(kind, model, train=..., val=...)
                                                 -> EvalResult     (metrics, files)
    seerlike.export(model, out, formats=[...])   -> ExportResult   (files, export.json)
    seerlike.finetune(data, out, init=...)       -> PretrainResult (a fine-tuned classifier)
    seerlike.selftrain(method, labeled, unlabeled, out, init=..., teacher=...)
                                                 -> SelfTrainResult (FixMatch / Noisy Student)
"""

__version__ = "0.1.0"

_API = ("ingest", "pretrain", "extract", "evaluate", "export", "finetune", "selftrain",
        "IngestResult", "PretrainResult", "ExtractResult", "EvalResult", "ExportResult", "SelfTrainResult")


def __getattr__(name: str):
    # the API imports torch: load it on first use so `seerlike --help` and the config tools stay fast
    if name in _API:
        from seerlike import api

        return getattr(api, name)
    raise AttributeError(f"module 'seerlike' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
