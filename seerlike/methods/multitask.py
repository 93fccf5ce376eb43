"""Multi-task pretext training (Doersch & Zisserman 2017): several pretext tasks on one trunk.

The tasks are the registered pretext methods themselves (``rotnet``, ``jigsaw``,
``colorization``, ``relative_position``), each built with its own config (its defaults, then
``method.settings[task]``) around a :class:`SharedTrunk`: a handle on the one trunk that the
task calls but does not own, so the trunk's weights are the method's ``backbone.*`` once, and
each task keeps its own heads, buffers, loss and hooks (``tasks.<task>.*``). Nothing of a task
is copied here.

Two schedules (``schedule``):

- ``sum``: every task runs on every batch; the loss is the weighted sum of the tasks' losses.
- ``interleave``: each batch (each micro-batch with accumulation) goes to one task, in turn
  (rotnet, jigsaw, colorization, rotnet, ...), and only that task's head trains on it: the
  "swap the final layers by batch type" scheme. The turn is a persistent counter, the same on
  every rank (so the ranks run the same task and their collectives match) and after a resume.
  The heads that sat out get no update: their gradients are dropped before the optimizer step
  (they are first touched with a zero-weighted term, so DDP sees every parameter used).

The weights scale each task's loss in both schedules.

**Input channels.** Colorization feeds its trunk the lightness alone (1 channel) while the other
tasks feed RGB. The shared trunk stays an RGB trunk (so export, extraction and evaluation treat
it as any other): colorization's lightness input ``(L - 50) / 100`` is rendered as the gray
sRGB image of the same L* (the inverse of the CIE L* and sRGB transfer functions), replicated to
3 channels and normalised like every view (colorization's ``mean``/``std``, which must equal
``data.augment``'s). To the trunk it looks like a view after the grayscale augmentation, and
colorization still sees no colour.

**Views.** ``views`` gives each task the indices of the data views it takes (a jigsaw wants a
larger view than rotation); empty: every task takes every view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from seerlike.config import ConfigError, from_dict
from seerlike.data.augment import IMAGENET_MEAN, IMAGENET_STD
from seerlike.methods.base import MethodBase, MethodConfig, need_backbone_dim

PRETEXT_TASKS = ("rotnet", "jigsaw", "colorization", "relative_position")
"""The methods a multi-task run can combine: single-trunk pretext tasks without a memory or labels."""


def gray_from_lightness(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """The normalised 3-channel gray sRGB image whose CIE L* is ``L = 100 x + 50`` (``x``: the
    ``(B, 1, H, W)`` lightness input of ``pretext_ops.lightness_input``)."""
    with torch.autocast(x.device.type, enabled=False):
        fy = (100.0 * x.float() + 50.0 + 16.0) / 116.0
        d = 6.0 / 29.0
        y = torch.where(fy > d, fy.clamp_min(d) ** 3, 3 * d * d * (fy - 4.0 / 29.0)).clamp(0.0, 1.0)
        v = torch.where(y <= 0.0031308, 12.92 * y, 1.055 * y.clamp_min(0.0031308) ** (1 / 2.4) - 0.055)
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        return ((v - m) / s).to(x.dtype)


class SharedTrunk(nn.Module):
    """One task's handle on the multi-task trunk: calls it, does not own it (no second copy of its
    weights in the state dict, no second FSDP wrapping). Lightness inputs (1 channel) are rendered
    as normalised gray RGB (module docstring); ``set_in_channels`` records the task's wish and leaves
    the trunk RGB."""

    def __init__(self, trunk: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self._trunk = (trunk,)  # a tuple: not registered as a submodule
        self.mean, self.std = tuple(mean), tuple(std)
        self.out_dim = need_backbone_dim("multitask", trunk)
        for name in ("feature_dims", "feature_strides"):
            if hasattr(trunk, name):
                setattr(self, name, getattr(trunk, name))
        self.in_channels = 3

    def set_in_channels(self, channels: int) -> SharedTrunk:
        if channels not in (1, 3):
            raise ValueError(f"a shared multi-task trunk takes RGB or lightness (1 channel) inputs, not {channels}")
        self.in_channels = channels
        return self

    def _rgb(self, x: Tensor) -> Tensor:
        return gray_from_lightness(x, self.mean, self.std) if x.shape[1] == 1 else x

    def forward(self, x: Tensor) -> Tensor:
        return self._trunk[0](self._rgb(x))

    def forward_features(self, x: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        return self._trunk[0].forward_features(self._rgb(x), **kwargs)


def task_class(name: str) -> type:
    """The registered pretext method ``name``; a name outside :data:`PRETEXT_TASKS` fails naming them."""
    registry = MethodConfig.registry
    if name not in PRETEXT_TASKS or name not in registry:
        known = [t for t in PRETEXT_TASKS if t in registry]
        raise ConfigError(f"multitask: {name!r} is not a pretext task that can share a trunk; choose from {known}")
    return registry[name]


def task_config(name: str, settings: dict[str, Any]) -> MethodConfig:
    """Task ``name``'s config: its defaults, then ``settings`` (checked like ``method.*`` overrides)."""
    if "name" in settings:
        raise ConfigError(f"method.settings.{name}: leave out 'name' (the key names the task)")
    return from_dict(task_class(name).Config, dict(settings), prefix=f"method.settings.{name}")


class MultiTask(MethodBase):
    """Pretext tasks on one backbone returning pooled features ``(B, backbone.out_dim)``."""

    @dataclass(kw_only=True)
    class Config(MethodConfig):
        name: Literal["multitask"] = "multitask"
        """Multi-task pretext training (Doersch & Zisserman 2017): the pretext methods composed on one trunk."""
        tasks: tuple[str, ...] = ("rotnet", "jigsaw", "colorization")
        """The pretext tasks (registered method names: rotnet, jigsaw, colorization, relative_position)."""
        weights: tuple[float, ...] = ()
        """Loss weight of each task, in the order of tasks; empty: 1 each."""
        schedule: Literal["sum", "interleave"] = "sum"
        """sum: every task on every batch, losses summed with the weights; interleave: one task per batch in turn."""
        views: tuple[tuple[int, ...], ...] = ()
        """Per task (in order), the indices of the data views it takes; empty: every task takes every view."""
        settings: dict[str, dict[str, Any]] = field(default_factory=dict)
        """Per task, its own config keys over its defaults, e.g. {jigsaw: {num_permutations: 100}}."""

        def __post_init__(self) -> None:
            if not self.tasks or len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"tasks must name at least one task, each once, got {list(self.tasks)}")
            if self.weights and (len(self.weights) != len(self.tasks) or any(w < 0 for w in self.weights)):
                raise ValueError(f"weights must give one value >= 0 per task ({len(self.tasks)}), "
                                 f"got {list(self.weights)}")
            if self.views and len(self.views) != len(self.tasks):
                raise ValueError(f"views must give one tuple of view indices per task ({len(self.tasks)}), "
                                 f"got {len(self.views)}")
            unknown = set(self.settings) - set(self.tasks)
            if unknown:
                raise ValueError(f"settings for tasks not in method.tasks: {sorted(unknown)}")
            for name in self.tasks:
                task_config(name, self.settings.get(name, {}))

        def task_weights(self) -> tuple[float, ...]:
            return self.weights or (1.0,) * len(self.tasks)

    @classmethod
    def check_views(cls, cfg: Config, sizes: list[int]) -> None:
        for i, name in enumerate(cfg.tasks):
            picked = cfg.views[i] if cfg.views else tuple(range(len(sizes)))
            bad = [v for v in picked if not 0 <= v < len(sizes)]
            if bad or not picked:
                raise ValueError(f"multitask: task {name} takes views {list(picked)} but the data config makes "
                                 f"{len(sizes)} views; fix method.views")
            task_class(name).check_views(task_config(name, cfg.settings.get(name, {})), [sizes[v] for v in picked])

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        need_backbone_dim("multitask", backbone)
        self.cfg, self.backbone = cfg, backbone
        self.weights = cfg.task_weights()
        self.tasks = nn.ModuleDict()
        for name in cfg.tasks:
            sub = task_config(name, cfg.settings.get(name, {}))
            trunk = SharedTrunk(backbone, getattr(sub, "mean", IMAGENET_MEAN), getattr(sub, "std", IMAGENET_STD))
            self.tasks[name] = task_class(name)(sub, trunk)
        # batches handed out so far: whose turn it is under the interleave schedule
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self._batches: int | None = None  # a Python copy: the buffer is read once (one device sync)
        self._ran: set[str] = set()
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_batches", None))

    def _views_of(self, i: int, views: list[Tensor]) -> list[Tensor]:
        return [views[v] for v in self.cfg.views[i]] if self.cfg.views else views

    def _next_task(self) -> int:
        if self._batches is None:
            self._batches = int(self.batches)
        turn = self._batches % len(self.cfg.tasks)
        self._batches += 1
        self.batches.fill_(self._batches)
        return turn

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        names = list(self.cfg.tasks)
        chosen = range(len(names)) if self.cfg.schedule == "sum" else [self._next_task()]
        loss, stats = 0.0, {}
        for i in chosen:
            term, task_stats = self.tasks[names[i]](self._views_of(i, views))
            loss = loss + self.weights[i] * term
            stats[f"{names[i]}_loss"] = term.detach()
            stats.update({f"{names[i]}_{k}": v for k, v in task_stats.items()})
            self._ran.add(names[i])
        if self.cfg.schedule == "interleave":
            idle = [p for i, n in enumerate(names) if i not in chosen for p in self.tasks[n].parameters()
                    if p.requires_grad]
            if idle:  # DDP expects a gradient for every parameter in every backward: a zero one (dropped
                # in on_after_backward for the tasks that ran in none of the step's micro-batches)
                loss = loss + 0.0 * sum(p.sum() for p in idle)
        return loss, stats

    def on_after_backward(self, step: int) -> None:
        for name, task in self.tasks.items():
            if name in self._ran:
                task.on_after_backward(step)
            else:  # sat this step out: no update, no momentum, no weight decay
                for p in task.parameters():
                    p.grad = None
        self._ran = set()

    def on_step_end(self, step: int, max_steps: int) -> None:
        for task in self.tasks.values():
            task.on_step_end(step, max_steps)

    @torch.no_grad()
    def reset_state(self) -> None:
        for task in self.tasks.values():
            task.reset_state()
        self.batches.zero_()
        self._batches = None
