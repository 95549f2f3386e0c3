"""The HTTP API's request and response bodies (pydantic: validated, and in the OpenAPI
schema)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class PolicySpec(BaseModel):
    """An egress policy: deny (or allow) all, then exceptions."""

    default: Literal["allow", "deny"] = "deny"
    allow_dns: bool = True
    allow_domains: list[str] = Field(default_factory=list, max_length=256)
    allow_ips: list[str] = Field(default_factory=list, max_length=256)
    allow_https: bool = False


class ShareSpec(BaseModel):
    host_path: str
    guest_path: str
    read_only: bool = True


class CreateRequest(BaseModel):
    """A sandbox to create: the builder's options as JSON."""

    name: str | None = Field(default=None, description="unique; generated when missing")
    image: Literal["debian", "minimal"] | None = None
    packages: list[str] = Field(default_factory=list, max_length=256)
    cpus: int = Field(default=1, ge=1, le=64)
    memory_mb: int = Field(default=512, ge=64, le=1 << 20)
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    lifetime: float | None = Field(default=None, gt=0)
    idle_timeout: float | None = Field(default=None, gt=0)
    network: Literal["none", "user_nat"] = "none"
    policy: PolicySpec | None = None
    shares: list[ShareSpec] = Field(default_factory=list, max_length=32)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME.match(value):
            raise ValueError("a name is 1-63 of a-z 0-9 _ . - (starting with a letter or digit)")
        return value


class SandboxInfo(BaseModel):
    name: str
    labels: dict[str, str]
    image: str
    created: float
    status: str
    expired: str | None = None
    node: str | None = None  # the Ray node it runs on (capsa serve --ray)


class ExecRequest(BaseModel):
    cmd: str | None = Field(default=None, description="a shell command line")
    argv: list[str] | None = Field(default=None, description="a program and its arguments")
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout: float | None = Field(default=None, gt=0)
    stdin: str = Field(default="", description="text fed to the command's stdin")


class CodeRequest(BaseModel):
    code: str
    language: Literal["python", "bash"] = "python"
    context: str | None = Field(default=None, description="a context id; none: a fresh one")
    timeout: float | None = Field(default=None, gt=0)


class CodeResult(BaseModel):
    context: str | None
    stdout: str
    stderr: str
    result: dict[str, str] | None
    displays: list[dict[str, str]]
    error: dict[str, str] | None
    exit_code: int | None
    truncated: bool


class ServerInfo(BaseModel):
    version: str
    sandboxes: int
    lost: list[str] = Field(description="sandboxes a previous server had when it died")
