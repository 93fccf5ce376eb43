"""Recipes of the semi-supervised stages: fine-tuning, FixMatch, the Noisy Student student.

`seerlike finetune --init PRETRAINED --data LABELED --run-dir R` and `seerlike selftrain
--method fixmatch|noisy_student ...` fill in the data, the classes and the models.

The ``*_tiny`` recipes are CPU-sized for cifar10-dev (``resnet10_cifar``, the quickstart's
backbone, on the whole 32 px images): the paper's augmentation, losses and thresholds with
smaller batches, one intra-op thread per process, and the settings that assume hundreds of
thousands of steps (FixMatch's moving average) fitted to the few thousand a CPU budget buys;
each docstring says what differs from the official code and why. They are starting points,
not tuned (docs/benchmarks.md, "Semi-supervised stages", says what was measured). The
ResNet-50 recipes carry the published ImageNet settings (sources in each docstring) for GPU
clusters.
"""

from __future__ import annotations

from seerlike.data.augment import AugmentConfig, ViewConfig
from seerlike.data.pipeline import DataConfig
from seerlike.data.randaugment import RandAugmentConfig
from seerlike.engine.checkpoint import CheckpointConfig
from seerlike.engine.config import LoopConfig, ModelConfig, TrainConfig
from seerlike.engine.optim import OptimConfig
from seerlike.engine.parallelize import ParallelConfig
from seerlike.engine.precision import PrecisionConfig
from seerlike.methods.classifier import Finetune
from seerlike.methods.fixmatch import FixMatch, strong_view, weak_view
from seerlike.methods.noisy_student import NoisyStudent

CIFAR_SIZE = 32
"""The semi-supervised tiny recipes train on whole 32 px images, as they are evaluated (FixMatch's CIFAR setting)."""

CPU_THREADS = 1
"""torch intra-op threads of a ``*_tiny`` run (``loop.num_threads``; each of ``--nproc N`` ranks gets its own).

A 1.2M-parameter net on 32 px images gains little from a second OpenMP thread, and on a
2-core machine with other work on it the second thread cost 3 to 11 times the CPU seconds
of one per step (docs/benchmarks.md, "Step cost of the arms"): a CPU budget buys that many
fewer steps. On an idle many-core machine, run ``--nproc N`` (one thread per rank) or set
``loop.num_threads=0`` (torch's default: every core)."""


def _tiny(method, view: ViewConfig, *, batch_size: int, lr: float, drop_path: float = 0.0) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="resnet10_cifar", channels_last=True, drop_path=drop_path),
        method=method,
        data=DataConfig(batch_size=batch_size, num_workers=0, augment=AugmentConfig(views=[view])),
        # FixMatch's optimizer: SGD, Nesterov momentum 0.9, weight decay 5e-4 (CIFAR-10)
        optim=OptimConfig(name="sgd", lr=lr, final_lr=0.0, warmup_steps=0, momentum=0.9, nesterov=True,
                          weight_decay=5e-4),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="auto"),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
        loop=LoopConfig(max_steps=1000, log_every=10, num_threads=CPU_THREADS),
    )


def finetune_tiny() -> TrainConfig:
    """Fine-tuning on CIFAR-sized labels: FixMatch's weak augmentation (flip + 12.5% shift), batch 64, SGD 0.12 per 256
    (FixMatch's 0.03 at batch 64), label smoothing 0.1; the baseline both semi-supervised stages must beat."""
    return _tiny(Finetune.Config(label_smoothing=0.1), weak_view(CIFAR_SIZE), batch_size=64, lr=0.12)


FIXMATCH_CPU_EMA_DECAY = 0.99
"""FixMatch's evaluated moving average in ``fixmatch_tiny``: an average over about 1 / (1 - 0.99) = 100 steps.

The official code's 0.999 (a constant decay, TensorFlow's average without ``num_updates``)
averages over about 1,000 steps and still holds 0.999^n of the initial model after n steps:
37% after the recipe's 1,000 steps, 82% after 200. Its runs last 2^20 steps. A CPU budget
buys a few hundred to a few thousand (a step of 16 + 2 x 112 images costs about 0.65 CPU-s
on one thread: 15 CPU-minutes are about 1,300 steps), where 0.99 leaves 0.99^1300 < 10^-5 of
the initial model and still averages the last 100 steps. At GPU scale keep 0.999."""


def fixmatch_tiny() -> TrainConfig:
    """FixMatch with the paper's CIFAR-10 settings where a short CPU run allows them, and what differs, with why.

    As the official code (google-research/fixmatch ``fixmatch.py``): mu 7, tau 0.95, lambda_u 1,
    SGD with Nesterov momentum 0.9 at 0.03 for batch 64 (0.12 per 256: the LR follows the labeled
    batch), L2 weight decay 5e-4 on weights only (no biases, no BatchNorm), no warmup, no label
    smoothing, RandAugment with a random level per op + Cutout, one forward of all images.

    Differs: the labeled batch is 16 instead of 64 (with mu 7: 16 + 2 x 112 images a step), so
    that a CPU budget buys enough steps; the moving average decays at
    :data:`FIXMATCH_CPU_EMA_DECAY` (0.99) instead of 0.999 (why: its docstring); the LR follows
    the engine's cosine to 0 instead of cos(7 pi k / 16 K), which ends at 0.2 of the peak after
    2^20 steps: a run of a few hundred steps that stops mid-schedule learns less than one that
    anneals to 0 (Li et al. 2020, "Budgeted training"). tau stays 0.95 (the paper's ablation,
    Fig. 3a, has lower thresholds worse on CIFAR-10), but a short run may never reach it: a
    182-step run (120 CPU-s) had ``mask`` 0 throughout (docs/benchmarks.md, "Step cost of the
    arms"), and until some unlabeled image passes it FixMatch trains on its 16 labeled images a
    step only; a 1,222-step run (900 CPU-s) passed 17-26% of them from step 600 on (docs/benchmarks.md,
    "250 labels at 15 CPU-minutes an arm, seed 0"). The logged ``mask`` (the share that passes)
    shows where a run stands. Started from a fine-tuned model, head included (``--init FT_RUN
    method.init_head=true``), 17% passed at step 200 and the run beat fine-tuning by 4.2 points
    where the run from the trunk tied it (the same section, one seed)."""
    method = FixMatch.Config(strong=strong_view(CIFAR_SIZE), ema_decay=FIXMATCH_CPU_EMA_DECAY)
    return _tiny(method, weak_view(CIFAR_SIZE), batch_size=16, lr=0.12)


def noisy_student_tiny() -> TrainConfig:
    """The Noisy Student student on CIFAR-sized data, and what differs from the official code, with why.

    As the official code (google-research/noisystudent ``main.py``, ``train_offline.sh``): RandAugment
    N 2 at M 6 (its EfficientNet-B2 setting; its SVHN script uses 5), dropout 0.5, stochastic depth 0.2
    at the last block, threshold 0.3, soft labels, 3 pseudo-labeled images per labeled one (SVHN: 5),
    label smoothing 0.1 on labeled images.

    Differs: a labeled batch of 32 (+ 96 pseudo-labeled) instead of 4,096 (SVHN: 128); SGD with
    Nesterov as fine-tuning, weight decay 5e-4, instead of RMSProp at 0.016 per 256 with weight
    decay 1e-5 (ImageNet) / 1e-4 (SVHN): the optimizer of the other two arms, for a ResNet on
    CIFAR; no warmup (official: 5 epochs) and the engine's cosine to 0 (official: 0.97 every 2.4
    epochs): the student starts from the pretrained trunk, not from scratch, and a short run
    anneals (see ``fixmatch_tiny``); no moving average (``method.ema_decay`` 0; official: 0.9999
    with TensorFlow's ``num_updates`` ramp, over ~350 epochs), as fine-tuning, the baseline."""
    noised = weak_view(CIFAR_SIZE)
    noised.randaugment = RandAugmentConfig(num_ops=2, magnitude=6, translate=0.125)
    return _tiny(NoisyStudent.Config(label_image_size=CIFAR_SIZE, label_resize=CIFAR_SIZE), noised, batch_size=32, lr=0.12, drop_path=0.2)


# ---------------------------------------------------------------- ImageNet-scale


def _standard_view(size: int, randaugment: RandAugmentConfig | None = None) -> ViewConfig:
    """The supervised ImageNet view: random resized crop (0.08-1) + flip, no colour jitter."""
    return ViewConfig(count=1, size=size, scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                      randaugment=randaugment or RandAugmentConfig())


def _resnet50(method, view: ViewConfig, *, batch_size: int, lr: float, weight_decay: float, warmup: int,
              max_steps: int, drop_path: float = 0.0) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="resnet50", drop_path=drop_path),
        method=method,
        data=DataConfig(batch_size=batch_size, num_workers=8, augment=AugmentConfig(views=[view])),
        optim=OptimConfig(name="sgd", lr=lr, final_lr=0.0, warmup_steps=warmup, momentum=0.9, nesterov=True,
                          weight_decay=weight_decay),
        parallel=ParallelConfig(strategy="ddp"),
        precision=PrecisionConfig(dtype="bf16"),
        checkpoint=CheckpointConfig(every_steps=2500, keep_last=3),
        loop=LoopConfig(max_steps=max_steps, log_every=100),
    )


def finetune_resnet50() -> TrainConfig:
    """Fine-tuning a self-supervised ResNet-50 on (a fraction of) ImageNet's labels: batch 32 per rank, SGD 0.05 per
    256 with Nesterov, no weight decay, label smoothing 0.1 (SimCLR / SwAV semi-supervised fine-tuning use small LRs
    and no decay; `--backbone-lr` sets a slower trunk)."""
    return _resnet50(Finetune.Config(num_classes=1000, label_smoothing=0.1), _standard_view(224), batch_size=32,
                     lr=0.05, weight_decay=0.0, warmup=0, max_steps=50_000)


def fixmatch_resnet50() -> TrainConfig:
    """FixMatch on ImageNet with RandAugment, from google-research/fixmatch imagenet/: mu 5, lambda_u 10, tau 0.7,
    EMA 0.999, SGD 0.1 per 256 with Nesterov, weight decay 3e-4, warmup; labeled batch 32 per rank."""
    strong = _standard_view(224, RandAugmentConfig(num_ops=2, magnitude=9, random_magnitude=True, op_p=0.5,
                                                   cutout=0.5))
    method = FixMatch.Config(num_classes=1000, unlabeled_ratio=5, lambda_u=10.0, threshold=0.7, strong=strong)
    return _resnet50(method, _standard_view(224), batch_size=32, lr=0.1, weight_decay=3e-4, warmup=5000,
                     max_steps=300_000)


def noisy_student_resnet50() -> TrainConfig:
    """The Noisy Student student at ImageNet scale: RandAugment N 2, M 9 (the official code uses up to 27 for its
    largest students), dropout 0.5, stochastic depth 0.2, threshold 0.3, soft labels, unlabeled ratio 3,
    130,000 images per class after balancing (Xie et al. 2020); SGD instead of RMSProp for a ResNet."""
    noised = _standard_view(224, RandAugmentConfig(num_ops=2, magnitude=9))
    method = NoisyStudent.Config(num_classes=1000, per_class=130_000)
    return _resnet50(method, noised, batch_size=32, lr=0.1, weight_decay=1e-4, warmup=2500, max_steps=350_000,
                     drop_path=0.2)


RECIPES: dict = {"finetune_tiny": finetune_tiny, "fixmatch_tiny": fixmatch_tiny,
                 "noisy_student_tiny": noisy_student_tiny, "finetune_resnet50": finetune_resnet50,
                 "fixmatch_resnet50": fixmatch_resnet50, "noisy_student_resnet50": noisy_student_resnet50}
