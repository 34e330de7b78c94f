"""The tiny UNet the tests train in seconds (issue 16: one copy instead of one per test file):
:data:`TINY_UNET`, its options as a dict for ``config_from_dict``, and :data:`TINY_UNET_TOML`, the
same model as the ``[model]`` tables of a TOML run file."""
from __future__ import annotations

#: backbone options of a UNet small enough to train for a few steps on one CPU thread
TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_levels": [], "mid_attn": False}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


#: the ``[model]`` and ``[model.options]`` tables of a run file training :data:`TINY_UNET` (no braces:
#: safe inside ``str.format`` templates and f-strings)
TINY_UNET_TOML = '[model]\nbackbone = "unet"\n[model.options]\n' + "\n".join(
    f"{k} = {_toml_value(v)}" for k, v in TINY_UNET.items())
