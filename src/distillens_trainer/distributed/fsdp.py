"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for distillation: the teacher's sharding, and the norm and head
parameters the objective reads outside the models' forwards.

Under FSDP2 a module's parameters are sharded ``DTensor`` s between forwards and plain gathered tensors from its
group's pre-forward until it reshards. The logit lens and the fused output term call the final norm and the LM
head *after* the forward, so:

* :func:`gather_for_objective` gathers the groups owning those modules once for the whole objective of a step
  (a no-op when they are still gathered, which is the usual case: a root or tail group keeps its parameters after
  the forward). The student's stay gathered until FSDP reduce-scatters their gradient after the backward; the
  teacher's are released with :func:`release` once the objective is computed.
* :func:`call_unhooked` calls such a module without FSDP's hooks, so a lens pair or a chunk does not register a
  backward hook of its own (each would reduce-scatter and reshard the group in the middle of the backward).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..models.facts import module_class

FSDP_V1_REFUSAL = (
    "DistillLensTrainer supports FSDP2, not FSDP v1: set fsdp_version: 2 in the accelerate config (or "
    "fsdp_config={'fsdp_version': 2}); see examples/fsdp/."
)


def check_fsdp_config(trainer_args: Any) -> None:
    """ValueError (:data:`FSDP_V1_REFUSAL`) when the Trainer arguments ask for FSDP v1, before accelerate builds
    its plugin (which, in one process on a CPU, fails first with an unrelated error)."""
    config = getattr(trainer_args, "fsdp_config", None) or {}
    if (
        _requested(trainer_args)
        and getattr(trainer_args, "fsdp", None)
        and int(config.get("version", 2)) == 1
    ):
        raise ValueError(FSDP_V1_REFUSAL)


def _requested(trainer_args: Any) -> bool:
    fsdp = getattr(trainer_args, "fsdp", None)
    asked = bool(fsdp) and fsdp not in ("", [], "False", "false")
    return asked or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_version(trainer_args: Any, accelerator: Any) -> int | None:
    """1 or 2 when this run shards the student with FSDP (Trainer arguments or an accelerate config), else None.

    Raises ValueError when FSDP was asked for but accelerate runs the job another way (on a machine without a GPU
    backend it silently becomes DDP, with a full student and teacher on every rank)."""
    state = getattr(accelerator, "state", None)
    plugin = getattr(state, "fsdp_plugin", None) if state is not None else None
    distributed_type = getattr(accelerator, "distributed_type", None)
    distributed_type = str(getattr(distributed_type, "value", distributed_type))
    active = distributed_type == "FSDP"
    if active and plugin is not None:
        return int(getattr(plugin, "fsdp_version", 1) or 1)
    if _requested(trainer_args):
        raise ValueError(
            f"fsdp is set but accelerate runs this job as {distributed_type} (no FSDP: every rank would hold a "
            "full student and teacher): launch on GPUs with torchrun or accelerate launch, or drop fsdp."
        )
    return None


def is_fsdp_module(module: nn.Module) -> bool:
    """True for a module that ``fully_shard`` manages (its class derives from ``FSDPModule``)."""
    return module_class(module) is not type(module)


def fsdp_owner(model: nn.Module, module: nn.Module) -> nn.Module | None:
    """The FSDP2 module whose group holds ``module``'s own parameters: ``module`` itself or its nearest sharded
    ancestor in ``model``; None when nothing above it is sharded."""
    names = {id(sub): name for name, sub in model.named_modules()}
    name = names.get(id(module))
    if name is None:
        return None
    best: tuple[int, nn.Module] | None = None
    for other_name, other in model.named_modules():
        inside = other_name == "" or name == other_name or name.startswith(other_name + ".")
        if inside and is_fsdp_module(other) and (best is None or len(other_name) > best[0]):
            best = (len(other_name), other)
    return best[1] if best is not None else None


def fsdp_owners(model: nn.Module, modules: Iterable[nn.Module | None]) -> list[nn.Module]:
    """The distinct FSDP2 owners of ``modules`` (see :func:`fsdp_owner`), in order; empty without FSDP2."""
    owners: dict[int, nn.Module] = {}
    for module in modules:
        owner = fsdp_owner(model, module) if module is not None else None
        if owner is not None:
            owners.setdefault(id(owner), owner)
    return list(owners.values())


def is_gathered(owner: nn.Module) -> bool:
    """True when every parameter group of an FSDP2 module holds its gathered (unsharded) parameters."""
    state = owner._get_fsdp_state()
    return all(group.is_unsharded for group in state._fsdp_param_groups)


def gather_for_objective(owners: Sequence[nn.Module]) -> None:
    """Gather each owner's parameters unless they are already gathered (then it costs nothing)."""
    for owner in owners:
        if not is_gathered(owner):
            owner.unshard()


def release(owners: Sequence[nn.Module]) -> None:
    """Free the owners' gathered parameters, back to their shards: the teacher's after the objective, the student's
    after an evaluation step (in training FSDP reshards them itself after reducing their gradient)."""
    for owner in owners:
        owner.reshard()


def call_unhooked(module: nn.Module, *args: Any) -> Any:
    """``module(*args)``; for an FSDP2 module its ``forward`` without FSDP's hooks (its group must be gathered)."""
    return module.forward(*args) if is_fsdp_module(module) else module(*args)


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes of ``model``'s own decoder layers, from its ``_no_split_modules`` (the unit FSDP shards by)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if module_class(m).__name__ in names})


def shard_teacher(teacher: nn.Module, mesh: Any) -> tuple[nn.Module, int]:
    """Shard a frozen teacher with ``fully_shard``: each of its own decoder layers, then its root (embeddings, final
    norm, head). Its parameters keep their dtype (no mixed-precision cast: it is already in ``teacher_dtype``).
    Returns the teacher (sharded in place) and the number of decoder layers sharded."""
    from torch.distributed.fsdp import fully_shard

    classes = decoder_layer_classes(teacher)
    if not classes:
        raise ValueError(
            f"cannot shard the teacher with FSDP2: {type(teacher).__name__} names no decoder-layer class in "
            "_no_split_modules; load it with AutoModelForCausalLM."
        )
    layers = [m for m in teacher.modules() if isinstance(m, classes) and not is_fsdp_module(m)]
    for layer in layers:
        fully_shard(layer, mesh=mesh)  # resharded after its forward: one layer gathered at a time
    fully_shard(teacher, mesh=mesh)  # the root keeps its parameters after the forward: the lens reads them
    return teacher, len(layers)


def shard_mesh(accelerator: Any, device: torch.device) -> Any:
    """The mesh the student is sharded over: accelerate's FSDP dimensions where it built a mesh, else a 1-D mesh
    over every rank of the default process group on ``device``'s type."""
    mesh = getattr(accelerator, "torch_device_mesh", None)
    config = getattr(accelerator, "parallelism_config", None)
    if mesh is not None and config is not None:
        return mesh[tuple(config.fsdp_dim_names)]
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))
