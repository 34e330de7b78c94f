"""The torch device a command runs on: :func:`resolve_device`, the one ``--device`` resolution.

``diffkit train``/``sample``/``assimilate`` and the domain plugins' commands use it (also as
``diffkit.cli.resolve_device``).  Its own module, so that the command modules that need it
(:mod:`diffkit.assimilate`) do not import :mod:`diffkit.cli`, which imports them.
"""
from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(name):
    """The torch device ``--device`` names (default: cuda if available); cuda without CUDA, or a name
    torch does not know, is a one-line error.  The domain plugins' commands use it too."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device ({' '.join(str(e).split())}); use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but CUDA is not available on this machine; use --device cpu")
    return device
