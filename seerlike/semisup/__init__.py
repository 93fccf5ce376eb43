"""Semi-supervised follow-up stages after pretraining: fine-tuning, Noisy Student, FixMatch (docs/semisup.md).

- ``labeling``: a teacher's pseudo-labels of unlabeled images (resumable, threshold, class balancing);
- ``data``: a labeled and an unlabeled stream side by side in every batch;
- ``stages``: the configs and runs behind `seerlike finetune`, `seerlike selftrain` and the API.

The methods themselves (the losses) are ``seerlike.methods.classifier``, ``fixmatch`` and
``noisy_student``, trained by the normal engine.
"""
