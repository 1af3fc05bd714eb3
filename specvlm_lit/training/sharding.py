"""Targets bigger than one GPU: the frozen target's text-decoder layers sharded over the ranks, the drafter DDP.

:class:`ShardedTargetStrategy` (``trainer=fsdp``, docs/large_targets.md) is Lightning's DDP strategy for the
LightningModule (drafter + compressor: replicated, gradients all-reduced, checkpoints exactly as under ``trainer=ddp``)
plus FSDP2 (``torch.distributed.fsdp.fully_shard``) on the frozen target's text-decoder layers, each layer its own
shard unit under the text decoder as FSDP root. A teacher forward all-gathers one layer at a time and frees it again
after the layer ran.

Why not Lightning's ``FSDPStrategy``: it wraps the LightningModule's own module tree in one FSDP (v1) root, and the
target is deliberately outside that tree (``distill._Frozen``), so it would stay whole on every GPU. Registering it
in the tree would make every parameter outside the auto-wrapped layers (the drafter, the compressor, the target's
embeddings, LM head and norms) part of the root unit's flat, sharded parameter, and every checkpoint the whole
module: ``state_dict_type=full`` gathers the 144 GB of a 72B target on rank 0 at each save, ``sharded`` writes a
directory of shards that ``torch.load`` (resume checks, ``train.py``'s export) cannot read. Here checkpoints keep
holding only the drafter.

What is sharded, and why only that:

* the text decoder's layers (the HF ``_no_split_modules`` classes stacked in a ``ModuleList`` of
  ``adapter._language_model()``): nearly all of the weights (70 of 73 B for Qwen2.5-VL-72B). The decoder runs once
  per teacher forward on every rank, so every rank all-gathers the same layers in the same order -- the condition
  for sharded parameters to work at all;
* not the vision tower: ranks hold different numbers and sizes of images (a text-only batch runs no tower), so its
  all-gathers would not pair up across ranks and training would hang. It is small (0.7 B for Qwen2.5-VL-72B);
* not the embeddings, LM head and final norm: the adapter and the drafter call and read them directly (EAGLE
  drafters share the target's embeddings and head), which needs whole tensors.

Everything that runs the target must therefore run it on every rank the same number of times: validation batches
(equal counts per rank) and not ``ValidationDecoding``, whose per-rank decodes take different numbers of target
forwards (refused at start-up, :func:`check_collective_safe`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from ..errors import UserError

__all__ = [
    "ShardedTargetStrategy",
    "ShardingError",
    "check_collective_safe",
    "decoder_layer_classes",
    "is_sharded",
    "place_target",
    "shard_frozen_target",
    "target_shard_units",
]

#: Set on a target model once its layers are sharded (the number of shard units): sharding happens once.
_SHARDED = "_specvlm_shard_units"


class ShardingError(UserError):
    """A configuration the sharded-target strategy cannot run (names the setting and the fix)."""


def target_shard_units(adapter) -> list[nn.Module]:
    """The target's text-decoder layers: modules of its HF ``_no_split_modules`` classes in a ``ModuleList`` of the
    language model (the stacked layers; not the vision tower, not embeddings)."""
    names = set(getattr(adapter.model, "_no_split_modules", None) or ())
    units = [
        layer
        for module in adapter._language_model().modules()
        if isinstance(module, nn.ModuleList)
        for layer in module
        # the MRO: fully_shard swaps a unit's class for an FSDP subclass of it
        if any(cls.__name__ in names for cls in type(layer).__mro__)
    ]
    if not units:
        raise ShardingError(
            f"{type(adapter.model).__name__}: no text-decoder layer of its _no_split_modules ({sorted(names)}) was "
            f"found in a ModuleList of its language model, so there is nothing to shard; train it with trainer=ddp, "
            f"or add the layer class to the model's _no_split_modules"
        )
    return units


def decoder_layer_classes(adapter) -> tuple[type[nn.Module], ...]:
    """The HF classes :func:`target_shard_units` shards (one per decoder-layer type; usually one)."""
    names = set(adapter.model._no_split_modules)
    return tuple(
        dict.fromkeys(
            next(cls for cls in type(u).__mro__ if cls.__name__ in names) for u in target_shard_units(adapter)
        )
    )


def is_sharded(model: nn.Module) -> bool:
    return getattr(model, _SHARDED, None) is not None


def _move_unsharded(model: nn.Module, units: Iterable[nn.Module], device: torch.device) -> None:
    """Move the parameters and buffers outside the shard units to ``device``, in place (``p.data``: tied weights,
    e.g. embeddings shared with the LM head, stay one tensor); the units' shards are already there."""
    inside = {id(m) for u in units for m in u.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for p in module.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = b.to(device)


def shard_frozen_target(adapter, mesh, device: torch.device) -> int:
    """Shard the frozen target's decoder layers over ``mesh`` (FSDP2), put the rest whole on ``device``.

    Each layer is a unit of its own, resharded after its forward (the target has no backward, so a gathered layer is
    never needed again in the step). Idempotent; returns the number of units.
    """
    from torch.distributed.fsdp import fully_shard

    model = adapter.model
    if is_sharded(model):
        return getattr(model, _SHARDED)
    units = target_shard_units(adapter)
    for unit in units:
        # Moves this layer's parameters to the mesh's device and keeps only this rank's shard: one layer at a time,
        # so the whole target never has to fit on one device.
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    # The text decoder becomes the layers' common FSDP root (one shared communication context, so on a GPU the next
    # layer's all-gather can run while this one computes), owning none of its own parameters: the embeddings and the
    # final norm, which the adapter and the drafter use directly, stay whole.
    decoder = adapter._language_model()
    in_units = {id(p) for u in units for p in u.parameters()}
    whole = {p for p in decoder.parameters() if id(p) not in in_units}
    fully_shard(decoder, mesh=mesh, reshard_after_forward=True, ignored_params=whole)
    _move_unsharded(model, units, device)
    setattr(model, _SHARDED, len(units))
    return len(units)


def check_collective_safe(callbacks: Iterable) -> None:
    """Refuse callbacks that run the target a different number of times on each rank (a sharded target's forward
    is a collective: such a run would hang)."""
    from .callbacks import ValidationDecoding

    for cb in callbacks:
        if isinstance(cb, ValidationDecoding) and cb.samples > 0:
            raise ShardingError(
                "callbacks.validation_decoding decodes different prompts for different numbers of target forwards on "
                "each rank, which a sharded target (trainer=fsdp) cannot do: every target forward is a collective. "
                "Set callbacks.validation_decoding=null and measure val/sigma with decode.py after training"
            )


class ShardedTargetStrategy(DDPStrategy):
    """DDP for the drafter + FSDP2 shards of the frozen target's decoder layers (module docstring).

    Args:
        shard_across_nodes: shard each layer over all ranks of all nodes. The default, ``False``, shards within each
            node and replicates over nodes (HSDP): the per-layer all-gathers stay on the node's own links, and a
            frozen target has no gradients to synchronise across the replicas. Set it when one node's GPUs together
            cannot hold the target.
        *args, **kwargs: :class:`~lightning.pytorch.strategies.DDPStrategy`'s (``find_unused_parameters``,
            ``timeout``, ``start_method``, ...).
    """

    def __init__(self, *args, shard_across_nodes: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.shard_across_nodes = bool(shard_across_nodes)

    def setup_environment(self) -> None:
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None:  # before the process group starts: a refusal then leaves nothing waiting
            check_collective_safe(trainer.callbacks)
        super().setup_environment()

    def target_mesh(self):
        """``(shard,)`` over all ranks, or ``(replicate, shard)`` = ``(num_nodes, devices per node)`` (HSDP)."""
        from torch.distributed.device_mesh import init_device_mesh

        kind = self.root_device.type
        if self.shard_across_nodes or self.num_nodes == 1:
            return init_device_mesh(kind, (self.world_size,), mesh_dim_names=("shard",))
        return init_device_mesh(kind, (self.num_nodes, self.num_processes), mesh_dim_names=("replicate", "shard"))

    def shard_target(self, adapter) -> int:
        """Shard ``adapter``'s model over :meth:`target_mesh` (once; returns the number of shard units)."""
        if is_sharded(adapter.model):
            return getattr(adapter.model, _SHARDED)
        return shard_frozen_target(adapter, self.target_mesh(), self.root_device)

    def setup(self, trainer) -> None:
        # The LightningModule's setup hook normally sharded the target already (distill.place_target), before anything
        # moved it to the GPU; this covers modules that do not, before DDP wraps the drafter.
        target = getattr(self.lightning_module, "target", None)
        if target is None or not hasattr(target, "_language_model"):
            raise ShardingError(
                f"trainer=fsdp shards the frozen target of the LightningModule, but {type(self.lightning_module)} has "
                f"no `target` TargetAdapter; use trainer=ddp for it"
            )
        self.shard_target(target)
        super().setup(trainer)


def place_target(adapter, strategy, device: torch.device) -> None:
    """Put the frozen target on ``device`` -- or, under :class:`ShardedTargetStrategy`, shard it (which places the
    shards and the rest itself). The LightningModule's ``setup`` / ``on_fit_start`` call this."""
    if isinstance(strategy, ShardedTargetStrategy):
        strategy.shard_target(adapter)
    else:
        adapter.model.to(device)
