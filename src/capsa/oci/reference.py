"""Image references as users write them: ``python:3.11``, ``ghcr.io/org/app@sha256:...``,
``127.0.0.1:5000/app:tag``; Docker Hub names are normalized the way docker does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from capsa.errors import InvalidConfig

DOCKER_HUB = "registry-1.docker.io"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] to talk to
    repository: str  # e.g. library/python
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The canonical name, as shown by ``capsa image ls``."""
        host = "docker.io" if self.registry == DOCKER_HUB else self.registry
        base = f"{host}/{self.repository}"
        if self.digest:
            return f"{base}@{self.digest}"
        return f"{base}:{self.tag}"

    @property
    def wanted(self) -> str:
        """What to ask the registry's manifest endpoint for."""
        return self.digest or self.tag or "latest"


def parse_reference(text: str) -> Reference:
    """Parse ``text`` or raise InvalidConfig saying what is wrong with it."""
    if not text or any(c.isspace() for c in text):
        raise InvalidConfig(f"invalid image reference {text!r}")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidConfig(f"image digest must be sha256:<64 hex digits>, got {digest!r}")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InvalidConfig(f"invalid image tag {tag!r}")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, rest
        if "/" not in repository:
            repository = f"library/{repository}"
    if registry == "docker.io":
        registry = DOCKER_HUB
    for part in repository.split("/"):
        if not _COMPONENT.match(part):
            raise InvalidConfig(f"invalid repository name {repository!r} in {text!r}")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)
