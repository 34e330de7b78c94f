"""Exception types.  Every error names the problem and, where one exists, the fix."""


class DiffkitError(Exception):
    """Base class of all diffkit errors."""


class ShapeError(DiffkitError, ValueError):
    """A tensor has the wrong rank, channel count or spatial size."""


class NonFiniteError(DiffkitError, ValueError):
    """A tensor holds NaN or inf where finite values are required."""


class UnknownComponentError(DiffkitError, KeyError):
    """A schedule, sampler, backbone, adapter or metric name is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PluginError(DiffkitError):
    """A plugin is inconsistent (for example two plugins register the same name)."""


class ConfigError(DiffkitError, ValueError):
    """A configuration key or value is invalid."""


class CheckpointError(DiffkitError):
    """A checkpoint cannot be written or read: missing, truncated, corrupt, foreign or too new."""


class ObservationError(DiffkitError, ValueError):
    """Observations for guided sampling are invalid: NaN values, a negative or non-finite noise
    std, or a shape that does not match the observation operator."""
