"""The Noisy Student student (Xie et al. 2020): labeled images plus a teacher's pseudo-labels, under noise.

One iteration of self-training: a teacher (a fine-tuned classifier, or the previous student)
labels the unlabeled images without noise (`seerlike.semisup.labeling`: confidence threshold,
class balancing, soft or hard labels, a parquet beside the data's manifest); this student then
learns from labeled and pseudo-labeled images with input noise (RandAugment in the data
config), dropout before the head and stochastic depth (``model.drop_path``), and becomes the
next iteration's teacher. `seerlike selftrain --method noisy_student` runs the iterations.

Each step takes B labeled and ``unlabeled_ratio`` x B pseudo-labeled images through one forward:

    loss = mean_labeled CE(smooth(onehot)) + ratio x mean_pseudo w_i CE(target_i)

as ``data_loss`` in the official code (google-research/noisystudent ``main.py``): each term a
mean over its own batch, the pseudo-labeled one scaled by the batch ratio. ``w_i`` is the
image's weight from class balancing (its copies, normalised to mean 1: a sample that balancing
duplicates c times counts c times, in expectation exactly the duplicated set). Soft targets
get no label smoothing, hard ones the labeled images' (as the official code).

``labels`` holds, for the B labeled then the pseudo-labeled rows, each row's target
distribution times its weight: (B + U, num_classes) float (`seerlike.semisup.data` builds it).
Defaults are the paper's and the official code's (ImageNet: section 3 and appendix A).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from seerlike.methods.base import need_views
from seerlike.methods.classifier import Classifier, ClassifierConfig, smoothed, soft_cross_entropy


class NoisyStudent(Classifier):
    """A noised student on labeled + pseudo-labeled images (one iteration of Noisy Student self-training)."""

    @dataclass(kw_only=True)
    class Config(ClassifierConfig):
        name: Literal["noisy_student"] = "noisy_student"
        """Noisy Student self-training (Xie et al. 2020): `seerlike selftrain --method noisy_student`."""
        teacher: str = ""
        """The first teacher: a fine-tuned classifier (`seerlike finetune` run, checkpoint or export --with-head)."""
        unlabeled: str = ""
        """Unlabeled images the teacher labels (folder, CSV, shards or an ingested dataset)."""
        unlabeled_ratio: int = 3
        """Pseudo-labeled images per labeled image in a step (official code: 3 for EfficientNet-B1 to B7, 1 for B0)."""
        iterations: int = 1
        """Teacher -> student rounds; each student teaches the next (paper: 3 to reach its best model)."""
        students: list[str] = field(default_factory=list)
        """Student backbone per iteration, equal or larger than its teacher (empty: model.name every time)."""
        allow_smaller_student: bool = False
        """Train a student with fewer trunk parameters than its teacher anyway (the paper's students are equal or larger)."""
        threshold: float = 0.3
        """Pseudo-labels whose teacher confidence is below this are dropped (paper: 0.3)."""
        per_class: int = 0
        """Class balancing: images per class after it (paper: 130,000 on JFT; 0 = no balancing)."""
        soft: bool = True
        """Soft pseudo-labels (the teacher's distribution) or hard ones (its top class); the paper's default is soft."""
        label_image_size: int = 224
        """The teacher labels the centre crop of this side (as `seerlike extract --image-size`)."""
        label_resize: int = 256
        """Shorter side the images are resized to before that crop (as `seerlike extract --resize`)."""
        pseudo_labels: str = ""
        """The pseudo-label parquet of this iteration (`selftrain` sets it; docs/semisup.md says where it goes)."""
        dropout: float = 0.5
        """Dropout on the student's pooled features before the head (paper: 0.5)."""
        ema_decay: float = 0.0
        """Evaluated moving average of the student (official code: 0.9999 over ~350 epochs; 0 = none)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.unlabeled_ratio < 1 or self.iterations < 1 or self.per_class < 0:
                raise ValueError(f"noisy_student.unlabeled_ratio and iterations must be >= 1 and per_class >= 0, got "
                                 f"{self.unlabeled_ratio}, {self.iterations}, {self.per_class}")
            if not 0 <= self.threshold < 1:
                raise ValueError(f"noisy_student.threshold must be in [0, 1), got {self.threshold}")
            if self.students and len(self.students) != self.iterations:
                raise ValueError(f"noisy_student.students names {len(self.students)} backbones for "
                                 f"{self.iterations} iterations; give one per iteration (or none)")

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        need_views("noisy_student", sizes, 1, "labeled and pseudo-labeled images get the same noised view")

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if labels is None or len(views) != 2 or labels.ndim != 2:
            raise ValueError("the Noisy Student student trains on [labeled, pseudo-labeled] views with target "
                             "distributions: run it with `seerlike selftrain --method noisy_student`")
        b, u = views[0].shape[0], views[1].shape[0]
        if labels.shape != (b + u, self.cfg.num_classes):
            raise ValueError(f"targets of shape {tuple(labels.shape)} for {b} + {u} images of "
                             f"{self.cfg.num_classes} classes; the pseudo-labels come from a teacher of another "
                             "number of classes")
        labels = labels.to(views[0].device, non_blocking=True).float()
        logits = self.logits(views).float()
        eps_u = 0.0 if self.cfg.soft else self.cfg.label_smoothing
        loss_l = soft_cross_entropy(logits[:b], smoothed(labels[:b], self.cfg.label_smoothing)).mean()
        loss_u = soft_cross_entropy(logits[b:], smoothed(labels[b:], eps_u)).mean()
        loss = loss_l + (u / b) * loss_u
        agree = (logits[b:].argmax(1) == labels[b:].argmax(1)).float().mean()
        acc = (logits[:b].argmax(1) == labels[:b].argmax(1)).float().mean()
        return loss, {"acc": 100.0 * acc.detach(), "agreement": 100.0 * agree.detach(), "loss_l": loss_l.detach(),
                      "loss_u": loss_u.detach()}
