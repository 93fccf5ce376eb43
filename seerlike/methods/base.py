"""The Method contract: what the training engine, extraction and export rely on.

A method is one module (``nn.Module``) in one file that owns its heads, its state (queues,
momentum encoders, centres, memory banks: parameters or persistent buffers, so checkpoints
carry them) and its collectives. The engine knows nothing else about it:

- ``Config``: a ``kw_only`` dataclass subclassing :class:`MethodConfig` whose ``name`` field is
  ``Literal["<registry name>"]``; it is the ``method`` section of the training config.
- ``__init__(cfg, backbone)``: ``backbone`` is the trunk (pooled features of width
  ``backbone.out_dim``); the method keeps it as ``self.backbone``, where extraction and export
  find it (checkpoint keys ``backbone.*``). A method with ``needs_indices`` is built as
  ``__init__(cfg, backbone, *, num_samples)``: the number of samples of the training data.
- ``forward(views, labels=None) -> (loss, stats)``: ``views`` are the batch's views in the data
  config's order (one tensor per view, same batch size); ``labels`` are the batch's (pseudo-)
  labels, passed only when ``needs_labels``. ``loss`` is a scalar to minimise, ``stats`` a few
  scalar tensors for the metrics log (keep them tensors: converting syncs the device).
- ``needs_indices`` (default False): the method keeps a memory over the whole dataset (memory
  banks, per-sample cluster assignments). It is then called as
  ``forward(views, labels=None, indices=indices)``: ``indices`` is an int64 tensor ``(B,)`` on the
  views' device, each sample's global index in ``[0, num_samples)``: its position in the source's
  listing (sorted image files or CSV rows; for shards, the samples numbered shard after shard in
  the manifest's / brace pattern's order, in tar order inside a shard). An index names the same
  sample in every epoch, after a restart and on any world size (as long as the source is not
  changed). In an exact-mode epoch (``data.resampled=false``) no index appears twice over all
  ranks, and every one appears once when no sample is skipped and ``num_samples`` is a multiple
  of the global batch (the rest is dropped); ``resampled`` epochs draw with replacement.
  Samples that cannot be decoded never reach a batch, so their indices never appear.
- Per-rank state: a non-persistent buffer (``register_buffer(..., persistent=False)``) is left out
  of ``state_dict()`` but is saved by the engine's checkpoints in each rank's own file and
  restored when the run resumes on the same world size (on another world size it keeps the value
  ``__init__``/``reset_state`` gave it). Use it for state that differs between ranks (a rank's
  share of a memory bank); persistent buffers are for state every rank agrees on.
- ``on_after_backward(step)``: after the backward of the step's last micro-batch, before the
  optimizer (e.g. drop the gradient of frozen prototypes).
- ``on_step_end(step, max_steps)``: after the optimizer step (EMA updates, re-normalisation).
- ``reset_state()``: put buffers and derived submodules (targets, queues) in their initial
  state after the module was materialised from the meta device.
- ``check_views(cfg, sizes)``: classmethod; raises ``ValueError`` naming the fix when the data
  config's views (their sizes, in order) do not suit the method. Runs when the config is
  validated, before anything starts.
- ``stage``: ``"pretrain"`` for self-supervised methods that learn from unlabeled images (the
  quickstart can run them), ``"followup"`` for stages that need an input made by an earlier
  stage (ClusterFit's pseudo-labels, distillation's teacher).

:class:`MethodBase` gives the no-op defaults; docs/methods.md shows how to add a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from seerlike.config import Choice


@dataclass(kw_only=True)
class MethodConfig(Choice):
    """The ``method`` section: ``method.name`` picks the method, the other keys are its own settings."""

    name: str = "swav"
    """Which method trains the backbone (`seerlike config --reference` lists every method's keys)."""

    registry: ClassVar[dict[str, type]] = {}
    # the package's METHODS dict, set by seerlike/methods/__init__.py (which imports this
    # module first): no method module imports the package back

    @classmethod
    def choices(cls) -> dict[str, type]:
        return {name: method.Config for name, method in MethodConfig.registry.items()}

    @classmethod
    def upgrade(cls, data: dict) -> dict:
        """Configs saved with one subsection per method (``method.swav.*``): keep the chosen one, flattened."""
        name = data.get("name")
        if isinstance(data.get(name), dict):
            return {"name": name, **data[name]}
        return data


def default_method() -> MethodConfig:
    """The method a TrainConfig holds when none is given: SwAV's defaults."""
    return MethodConfig.choices()["swav"]()


@runtime_checkable
class Method(Protocol):
    """The contract every entry of ``seerlike.methods.METHODS`` meets (see the module docstring)."""

    Config: ClassVar[type[MethodConfig]]
    stage: ClassVar[Literal["pretrain", "followup"]]
    needs_labels: ClassVar[bool]
    needs_indices: ClassVar[bool]
    input_channels: ClassVar[int]
    backbone: nn.Module

    def forward(self, views: list[Tensor], labels: Tensor | None = None,
                indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]: ...

    def on_after_backward(self, step: int) -> None: ...

    def on_step_end(self, step: int, max_steps: int) -> None: ...

    def reset_state(self) -> None: ...

    @classmethod
    def check_views(cls, cfg: MethodConfig, sizes: list[int]) -> None: ...


class MethodBase(nn.Module):
    """No-op defaults of the contract's hooks; a method overrides what it needs."""

    stage: ClassVar[Literal["pretrain", "followup"]] = "pretrain"
    needs_labels: ClassVar[bool] = False
    needs_indices: ClassVar[bool] = False
    """True: built with ``num_samples=`` and given each batch's global sample ``indices`` (module docstring)."""
    input_channels: ClassVar[int] = 3
    """Channels of what the method feeds its trunk (1: the lightness alone); its random-init baseline takes the same."""

    def on_after_backward(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, max_steps: int) -> None:
        pass

    def reset_state(self) -> None:
        pass

    @classmethod
    def check_views(cls, cfg: MethodConfig, sizes: list[int]) -> None:
        pass


def need_views(method: str, sizes: list[int], n: int, fix: str = "") -> None:
    """A ``check_views`` helper: exactly ``n`` views, else a ValueError with the fix."""
    if len(sizes) != n:
        raise ValueError(f"{method} takes exactly {n} views per image but the data config makes {len(sizes)} "
                         f"({sizes}); {fix or f'set data.augment.views to {n} views'}")


def need_backbone_dim(method: str, backbone: nn.Module) -> int:
    """The trunk's pooled feature width, or a ValueError naming what is missing."""
    dim = getattr(backbone, "out_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"{method} needs a backbone with an integer .out_dim (pooled feature width)")
    return dim
