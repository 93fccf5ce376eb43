"""One optimizer step: forward and backward of every micro-batch, the method's hooks, the
non-finite check across ranks, the (scaled) optimizer step. The loop and the tests call it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from seerlike.engine.precision import PrecisionConfig, autocast


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite and the run is configured to stop on it."""


@dataclass
class StepResult:
    loss: float
    """Mean loss over the micro-batches and the ranks (0.0 when some rank's was not finite)."""
    stats: dict[str, Tensor] = field(default_factory=dict)
    """The method's stats of this rank's last micro-batch (tensors: no device sync here)."""
    images: int = 0
    """Images in the step over all ranks."""
    skipped: bool = False
    """A non-finite loss on some rank: no update was made (loop.skip_nonfinite)."""
    bad_ranks: list[int] = field(default_factory=list)
    """Ranks whose loss was not finite."""
    stop: bool = False
    """Some rank asked to stop (a signal): the caller checkpoints and exits."""


def train_step(model: nn.Module, method: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, micro_batches: Iterable, *, step: int, max_steps: int,
               precision: PrecisionConfig, device: torch.device, skip_nonfinite: bool = False,
               channels_last: bool = False, stop: Callable[[], bool] = lambda: False, num_micro: int | None = None) -> StepResult:
    """Train one step on ``micro_batches`` (objects with ``.views``, ``.labels`` and ``.indices``).

    ``micro_batches`` is read lazily when ``num_micro`` (their number) is given, so a caller can
    time the wait for each; otherwise it is read into a list first.
    ``model`` is what parallelize returned (DDP/FSDP wrapper or the method itself), ``method``
    the unwrapped method whose hooks run. The loss of each micro-batch is divided by their
    number, so accumulation over N micro-batches equals one step on their concatenation.
    One all-reduce carries ``stop()`` (read after the backward, so a signal that arrived during
    the step is seen at its end on every rank), the loss and which ranks saw a non-finite loss.
    Raises :class:`NonFiniteLoss` unless ``skip_nonfinite``.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    micro = micro_batches if num_micro is not None else list(micro_batches)
    n = num_micro if num_micro is not None else len(micro)
    if n < 1:
        raise ValueError("train_step needs at least one micro-batch")
    loss_sum = torch.zeros((), device=device)
    images, stats = 0, {}
    for i, batch in zip(range(n), micro):
        views = batch.views
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        images += views[0].shape[0] * world
        labels = batch.labels if method.needs_labels else None
        args = (views, labels) if labels is not None else (views,)
        kwargs = {"indices": _indices(method, batch)} if getattr(method, "needs_indices", False) else {}
        with _grad_sync(model, i == n - 1), autocast(precision, device):
            loss, stats = model(*args, **kwargs)
        scaled = loss / n
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
    method.on_after_backward(step)

    finite = bool(torch.isfinite(loss_sum))
    flags = torch.zeros(2 + world, dtype=torch.float64, device=device)
    flags[0] = float(stop())
    flags[1] = loss_sum / n if finite else 0.0
    flags[2 + rank] = 0.0 if finite else 1.0
    if world > 1:
        dist.all_reduce(flags)
    bad = [r for r in range(world) if flags[2 + r] > 0]
    result = StepResult(loss=float(flags[1]) / world, stats=stats, images=images, bad_ranks=bad, stop=bool(flags[0] > 0))
    if bad:
        if not skip_nonfinite:
            raise NonFiniteLoss(f"non-finite loss at step {step} on rank(s) {bad} (this is rank {rank})")
        optimizer.zero_grad(set_to_none=True)
        result.skipped = True
        return result
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.on_step_end(step, max_steps)
    return result


def _indices(method: nn.Module, batch) -> Tensor:
    """The batch's global sample indices, for a method that declares ``needs_indices``."""
    indices = getattr(batch, "indices", None)
    if indices is None:
        raise ValueError(f"{type(method).__name__} needs each sample's dataset index (needs_indices) but the batch "
                         "carries none; train it on the data pipeline's batches (seerlike.data.build_train_data)")
    return indices


def _grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulated step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()
