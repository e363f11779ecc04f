"""A simulated accelerator for CPU-only test runs: tensors that say they live on a device and keep their values
on the host, and a dispatch mode that fails on any op mixing them with host tensors.

Why not ``FakeTensorMode`` on ``"cuda"``: on a CPU-only build every view op (``weight[:vocab]``), every copy to
the device and every autograd node asks c10 for the CUDA device guard, which is absent ("PyTorch is not linked
with support for cuda devices"); a fake tensor has no values either, so code that reads them (``int(x)``,
``nonzero``, ``.tolist()``, boolean-mask indexing) cannot run. Here a tensor on the simulated device is an
:class:`OnDevice` wrapper whose ``device`` is ``meta`` (a device type whose guard exists in every build) around
a real host tensor, so every op runs with real values (results can be compared with a plain CPU run), and
:class:`SimulatedDevice` sees each op first:

* an op whose tensor arguments are on both the simulated device and the host fails with :class:`HostDeviceMix`
  naming the op (a 0-dim host tensor is allowed, as CUDA allows a CPU scalar);
* a factory or copy asked for the device (``device=DEVICE``, ``.to(DEVICE)``) makes an :class:`OnDevice`;
  ``torch.tensor(data, device=DEVICE)`` too; ``.cpu()`` and host reads (``.item()``, ``int()``,
  ``.tolist()``) give host values, as on an accelerator.

Use::

    with SimulatedDevice() as device:
        x = on_device(torch.randn(3, 4))
        y = code_under_test(x)
    assert_on_device(y)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")  # the simulated accelerator's device, as tensors on it report it


class HostDeviceMix(AssertionError):
    """An op received tensors on the simulated device and on the host."""


class OnDevice(torch.Tensor):
    """A tensor on the simulated device: ``device`` is :data:`DEVICE`, the values are ``self.host``."""

    host: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl  # ops go straight to __torch_dispatch__

    @staticmethod
    def __new__(cls, host: torch.Tensor) -> OnDevice:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            host.shape,
            strides=host.stride(),
            storage_offset=host.storage_offset(),
            dtype=host.dtype,
            device=DEVICE,
            requires_grad=host.requires_grad,
        )

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host

    def __repr__(self) -> str:
        return f"OnDevice({self.host!r})"

    def tolist(self) -> Any:  # a C method that refuses tensor subclasses: a host read
        return self.host.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a simulated-device tensor outside SimulatedDevice()")


class SimulatedDevice(TorchDispatchMode):
    """Runs every op on the host, fails on a host/device mix, and keeps device results on the device.

    ``with SimulatedDevice() as device``: inside, ``device.device_ops`` collects the ops that ran on the device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.device_ops: set[str] = set()
        self._factories = _HostDataFactories()

    def __enter__(self) -> SimulatedDevice:
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:
        super().__exit__(*exc_info)
        self._factories.__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        for tensor in tensors:
            if tensor.device == DEVICE and not isinstance(tensor, OnDevice):
                raise RuntimeError(
                    f"{func} got a {DEVICE} tensor without values: made where the harness cannot see"
                )
        on_device = any(isinstance(tensor, OnDevice) for tensor in tensors)
        host = [tensor for tensor in tensors if not isinstance(tensor, OnDevice) and tensor.dim() > 0]
        if on_device and host:
            shapes = ", ".join(f"{tuple(tensor.shape)} {tensor.dtype}" for tensor in host)
            raise HostDeviceMix(f"{func} mixes device tensors with host tensors ({shapes})")
        wanted = kwargs.get("device")
        if wanted is not None:  # a factory or a copy: the result goes where it was asked to
            on_device = torch.device(wanted).type == DEVICE.type
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), int(), float(), bool()
            on_device = False
        if on_device:
            self.device_ops.add(str(func.overloadpacket))
        result = func(*tree_map(_to_host, args), **tree_map(_to_host, kwargs))
        return tree_map(_to_device, result) if on_device else result


class _HostDataFactories(TorchFunctionMode):
    """``torch.tensor(data, device=DEVICE)`` and ``torch.as_tensor``: made on the host, then copied to the device
    (they copy Python data to a device below the dispatcher, where :class:`SimulatedDevice` cannot see it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        to_device = device is not None and torch.device(device).type == DEVICE.type
        if func in (torch.tensor, torch.as_tensor) and to_device:
            return func(*args, **(kwargs | {"device": "cpu"})).to(DEVICE)
        return func(*args, **kwargs)


def _to_device(value: Any) -> Any:
    return OnDevice(value) if isinstance(value, torch.Tensor) else value


def _to_host(value: Any) -> Any:
    if isinstance(value, OnDevice):
        return value.host
    if isinstance(value, torch.device) and value.type == DEVICE.type:
        return torch.device("cpu")
    if isinstance(value, str) and value == DEVICE.type:
        return "cpu"
    return value


def on_device(tensor: torch.Tensor) -> OnDevice:
    """A copy of the host ``tensor`` on the simulated device (a leaf, with its ``requires_grad``)."""
    copy = OnDevice(tensor.detach().clone())
    return copy.requires_grad_(tensor.requires_grad) if tensor.is_floating_point() else copy


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """The host values of a simulated-device tensor (a host tensor as it is)."""
    return tensor.host.detach() if isinstance(tensor, OnDevice) else tensor


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nest of tuples, lists, dicts and dataclass-like objects with tensor attributes."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif hasattr(value, "__dict__"):
        for item in vars(value).values():
            yield from tensors_in(item)


def assert_on_device(value: Any) -> None:
    """Every tensor in ``value`` (see :func:`tensors_in`) lives on the simulated device; there is at least one."""
    tensors = list(tensors_in(value))
    assert tensors, f"no tensor in {value!r}"
    for tensor in tensors:
        assert isinstance(tensor, OnDevice) and tensor.device == DEVICE, (
            f"a {tuple(tensor.shape)} {tensor.dtype} result is on {tensor.device} ({type(tensor).__name__})"
        )
