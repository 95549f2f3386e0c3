"""What a cluster sandbox is, as data a node can rebuild: the builder calls the caller made.

A :class:`Recipe` records each ``capsa.sandbox()`` builder call (name and arguments) and
applies it at once to a local builder too, so a bad value fails where it was written, as it
does locally. The node service replays the calls on its own ``capsa.sandbox()``: paths in
the arguments (shares, disks, kernels) are paths on the node that runs the sandbox.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, replace
from typing import Any

from capsa.api.sandbox import SandboxBuilder, default_image, sandbox
from capsa.errors import InvalidConfig

# The builder's describing methods; build(), pool() and the introspection ones are the
# cluster's own business.
BUILDER_CALLS = frozenset(
    {
        "cpus",
        "memory_mb",
        "timeout",
        "arch",
        "backend",
        "disk",
        "network",
        "interface",
        "serial_port",
        "mount",
        "share",
        "virtio_fs",
        "env",
        "hostname",
        "kernel",
        "initrd",
        "run",
        "image",
        "packages",
        "oci",
        "disk_size",
        "template",
        "lifetime",
        "idle_timeout",
    }
)
# vsock sockets are files on the node, out of the caller's reach.
NODE_LOCAL_CALLS = frozenset(
    {"vsock_listen", "vsock_listen_at", "vsock_connect", "vsock_connect_at"}
)
DEFAULT_MEMORY_MB = 512


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Recipe:
    calls: tuple[Call, ...] = field(default_factory=tuple)

    def then(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Recipe:
        if name in NODE_LOCAL_CALLS:
            raise InvalidConfig(
                f"{name}() gives a socket on the node that runs the sandbox; cluster sandboxes "
                "offer the agent API instead"
            )
        if name not in BUILDER_CALLS:
            raise AttributeError(f"cluster sandbox builders have no {name}()")
        call = Call(name, args, tuple(sorted(kwargs.items())))
        try:
            pickle.dumps(call)
        except Exception as e:
            raise InvalidConfig(
                f"{name}() was given a value that cannot be sent to a node: {e}"
            ) from None
        return replace(self, calls=(*self.calls, call))

    def with_default_image(self) -> Recipe:
        """The caller's default image (``$CAPSA_SANDBOX_IMAGE``) made explicit, so every node
        builds what the caller would have built locally."""
        if any(call.name in ("image", "oci") for call in self.calls):
            return self
        return replace(self, calls=(Call("image", (default_image(),)), *self.calls))

    def apply(self, builder: SandboxBuilder) -> SandboxBuilder:
        for call in self.calls:
            builder = _apply_one(builder, call)
        return builder

    def builder(self) -> SandboxBuilder:
        return self.apply(sandbox())

    @property
    def memory_mb(self) -> int:
        sizes = [c.args[0] for c in self.calls if c.name == "memory_mb" and c.args]
        return int(sizes[-1]) if sizes else DEFAULT_MEMORY_MB

    @property
    def poolable(self) -> bool:
        return not any(call.name == "disk_size" for call in self.calls)


def _apply_one(builder: SandboxBuilder, call: Call) -> SandboxBuilder:
    method = getattr(builder, call.name)
    result = method(*call.args, **dict(call.kwargs))
    if not isinstance(result, SandboxBuilder):
        raise TypeError(f"{call.name}() did not return its builder")
    return result
