"""The capsa exception tree.

Every error raised by capsa derives from :class:`CapsaError`, so callers can catch
as broadly or as narrowly as they need.
"""

from __future__ import annotations


class CapsaError(Exception):
    """Root of every capsa error."""

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (capsa.ray's node actors raise them in the
        # caller): rebuilt from their arguments and attributes, not through __init__, whose
        # keyword-only fields (exit_code, stream...) plain pickling would lose.
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(
    cls: type[CapsaError], args: tuple[object, ...], state: dict[str, object]
) -> CapsaError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidConfig(CapsaError):
    """A builder was given a value that can never work (checked before anything starts)."""


class UnsupportedFeature(CapsaError):
    """The chosen backend or platform cannot provide a requested feature."""


class BackendUnavailable(CapsaError):
    """No hypervisor backend can run here (for example QEMU is not installed)."""


class StartFailed(CapsaError):
    """The VMM process could not be started or died while starting."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n--- console tail ---\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class BootTimeout(StartFailed):
    """The guest did not reach the expected state within the configured timeout."""


class NotRunning(CapsaError):
    """The operation needs a running VM."""


class ConsoleNotEnabled(CapsaError):
    """The VM was built without ``console_enabled()``."""


class CapsaTimeout(CapsaError, TimeoutError):
    """An operation did not finish within its time bound."""


class PatternNotFound(CapsaError):
    """The console closed before the pattern appeared."""

    def __init__(self, pattern: str, seen: str = "") -> None:
        super().__init__(f"pattern not found in console output: {pattern!r}")
        self.pattern = pattern
        self.seen = seen


class AgentError(CapsaError):
    """The guest agent reported a failure (``errno`` is the guest's errno when known)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class AgentProtocolError(AgentError):
    """The agent channel carried something that does not follow the protocol."""


class AgentDisconnected(AgentError):
    """The agent channel closed (the guest stopped or the agent died)."""


class AgentLimitExceeded(AgentError):
    """The guest sent more than a bound the host set (bytes, entries, depth): the operation
    stopped there instead of letting the guest spend the host's memory or disk."""


class OutputLimitExceeded(AgentLimitExceeded):
    """A guest process wrote more than its output cap: the process was killed.

    ``stream`` is the stream that went past the cap (1 stdout, 2 stderr), ``limit`` the cap
    in bytes; ``stdout`` and ``stderr`` hold the output kept so far (at most ``limit`` bytes
    each; empty for a started process, whose kept output stays readable from its streams).
    """

    def __init__(
        self, message: str, *, stream: int, limit: int, stdout: bytes = b"", stderr: bytes = b""
    ) -> None:
        super().__init__(message)
        self.stream = stream
        self.limit = limit
        self.stdout = stdout
        self.stderr = stderr


class ProcessError(CapsaError):
    """A command run with ``check=True`` did not exit 0: its exit code (128 + signal when
    killed), whether its timeout killed it, and the output it wrote."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int,
        stdout: bytes = b"",
        stderr: bytes = b"",
        timed_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out


class SandboxExpired(CapsaError):
    """The sandbox was ended by its own limit (``lifetime`` or ``idle_timeout``); the
    message says which."""


class CodeContextError(CapsaError):
    """A code context cannot go on: its interpreter died or never started (``restart()``
    makes a new one)."""


class ImageBuildError(CapsaError):
    """A guest kernel or image could not be fetched or built."""


class PoolEmpty(CapsaError):
    """``try_reserve()`` found no idle member."""


class PoolShutdown(CapsaError):
    """The pool was closed."""


class SnapshotError(CapsaError):
    """Saving or restoring a VM's state failed (or the snapshot is not usable)."""


class SandboxLost(CapsaError):
    """A cluster sandbox is gone with the node (or node service) that ran it: every later
    call on its handle raises this, at once."""


class NodeLost(SandboxLost):
    """The node that ran the sandbox, or its node service, is gone (or unreachable): every
    sandbox on it is lost with it."""


class NoCapacity(CapsaError):
    """No node of the cluster has room for another sandbox (slots, memory, accelerator)."""
