"""The backbones' fast paths (issue 17) compute what the plain paths compute.

- ``unet`` option ``channels_last``: outputs and parameter gradients equal the contiguous net's
  within float rounding (2-D and 3-D, periodic axes, odd sizes), the output comes back contiguous;
- ``unet`` option ``fused_norm_act`` (:class:`GroupNormSiLU`, :func:`group_norm_act`): equal to
  ``F.silu(F.group_norm(...))`` (and to the unfused residual block) -- bit for bit in float32,
  within bf16 rounding under autocast -- with the same state-dict keys;
- attention: every backbone computes it with ``F.scaled_dot_product_attention``, checked against
  a hand-written ``softmax(q k^T / sqrt(d)) v`` with the module's own weights, and no backbone
  module holds a hand-written softmax attention;
- both options reach the constructor from a model config (``model.options``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from diffkit.config import config_from_dict
from diffkit.errors import ConfigError
from diffkit.layout import Layout
from diffkit.model import build_model
from diffkit_backbones import build_dit, build_unet
from diffkit_backbones.layers import GroupNorm32, GroupNormSiLU, group_norm_act

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = dict(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, num_heads=2, groups=4, attn_levels=(1,))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layout(shape, periodic=(), num_classes=0):
    spatial = ("x", "y", "z")[: len(shape)]
    return Layout(channels=("u", "v"), spatial=spatial, shape=shape, periodic=periodic, num_classes=num_classes)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every parameter (zero-initialised outputs and unit norms would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan) + (1.0 if p.ndim == 1 else 0.0) * 0.1)


def _pair(shape, periodic=(), **opts):
    """(plain unet, unet with ``opts``) with the same random weights."""
    lay = _layout(shape, periodic)
    torch.manual_seed(0)
    plain = build_unet(lay, **TINY_UNET)
    _randomize(plain)
    fast = build_unet(lay, **TINY_UNET, **opts)
    fast.load_state_dict(plain.state_dict())
    return lay, plain, fast


def _assert_grads_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Each parameter's gradient within ``rel`` of its largest entry (sums over many positions in another order)."""
    for n in want:
        tol = rel * float(want[n].abs().max()) + 1e-7
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=tol, msg=lambda m: f"{n}: {m}")


def _out_and_grads(model, x, c):
    model.zero_grad(set_to_none=True)
    out = model(x, c)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# -- fused GroupNorm + SiLU -----------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 12, 5), (2, 8, 6, 4, 3)])
def test_group_norm_act_is_silu_of_group_norm_bit_for_bit_in_fp32(shape):
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(shape, generator=g) + 1
    C = shape[1]
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    want = F.silu(F.group_norm(x, 4 if C % 4 == 0 else 2, w, b, 1e-5))
    got = group_norm_act(x, 4 if C % 4 == 0 else 2, w, b, 1e-5)
    assert torch.equal(got, want)
    scale, shift = torch.randn(shape[0], C, generator=g), torch.randn(shape[0], C, generator=g)
    bc = (shape[0], C) + (1,) * (len(shape) - 2)
    want = F.silu(F.group_norm(x, 2, w, b, 1e-5) * (1 + scale.view(bc)) + shift.view(bc))
    assert torch.equal(group_norm_act(x, 2, w, b, 1e-5, scale, shift), want)
    assert torch.equal(group_norm_act(x, 2, w, b, 1e-5, silu=False), F.group_norm(x, 2, w, b, 1e-5))


def test_group_norm_silu_module_matches_and_shares_the_state_dict():
    torch.manual_seed(0)
    ref = GroupNorm32(4, 12)
    _randomize(ref)
    fused = GroupNormSiLU(4, 12)
    fused.load_state_dict(ref.state_dict())
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 12, 7, 5, requires_grad=True)
    y1 = fused(x)
    torch.testing.assert_close(y1, F.silu(ref(x)), rtol=0, atol=0)
    g1 = torch.autograd.grad(y1.sum(), [x, fused.weight])
    g2 = torch.autograd.grad(F.silu(ref(x)).sum(), [x, ref.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # bf16 input: one rounding of the float32 result
    xb = x.detach().bfloat16()
    out = fused(xb)
    assert out.dtype == torch.bfloat16
    exact = F.silu(F.group_norm(xb.float(), 4, ref.weight.float(), ref.bias.float(), ref.eps))
    torch.testing.assert_close(out.float(), exact.bfloat16().float(), rtol=0, atol=0)


@pytest.mark.slow
def test_group_norm_silu_with_film_is_one_kernel_under_torch_compile():
    """Inductor emits norm statistics, FiLM and SiLU as a single generated kernel (CPU code here)."""
    from torch._inductor.utils import run_and_get_code

    m = GroupNormSiLU(4, 16)
    _randomize(m)
    x, sc, sh = torch.randn(2, 16, 8, 8), torch.randn(2, 16), torch.randn(2, 16)
    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(lambda a, b, c: m(a, b, c)), x, sc, sh)
    kernels = set(re.findall(r"\b(cpp_fused_\w+|triton_\w+)\s*=", "\n".join(codes)))
    assert len(kernels) == 1 and "group_norm" in next(iter(kernels)) and "silu" in next(iter(kernels)), kernels
    torch.testing.assert_close(out, m(x, sc, sh), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,periodic", [((16, 12), ()), ((7, 8), ("y",)), ((8, 8, 4), ())])
def test_unet_fused_norm_act_equals_the_unfused_net(shape, periodic):
    lay, plain, fused = _pair(shape, periodic, fused_norm_act=True)
    assert isinstance(fused.down[0].res.norm1, GroupNormSiLU) and type(plain.down[0].res.norm1) is GroupNorm32
    x, c = torch.randn(2, 2, *shape), torch.tensor([-5.0, 7.0])
    o1, g1 = _out_and_grads(plain, x, c)
    o2, g2 = _out_and_grads(fused, x, c)
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-6)
    _assert_grads_close(g2, g1, 1e-6)


def test_unet_fused_norm_act_under_bf16_autocast_is_within_bf16_rounding():
    lay, plain, fused = _pair((16, 16), fused_norm_act=True)
    x, c = torch.randn(4, 2, 16, 16), torch.linspace(-10, 10, 4)
    ref = plain(x, c).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(x, c).float(), fused(x, c).float()
    scale = ref.abs().max()
    assert (a - ref).abs().max() < 0.05 * scale and (b - ref).abs().max() < 0.05 * scale
    assert (b - a).abs().max() < 0.05 * scale


# -- channels_last ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape,periodic,fused", [((16, 12), (), False), ((7, 8), ("y",), True),
                                                   ((8, 6, 4), ("x",), False)])
def test_unet_channels_last_equals_contiguous_outputs_and_gradients(shape, periodic, fused):
    lay, plain, cl = _pair(shape, periodic, channels_last=True, fused_norm_act=fused)
    if fused:
        plain = build_unet(lay, **TINY_UNET, fused_norm_act=True)
        plain.load_state_dict(cl.state_dict())
    fmt = torch.channels_last if len(shape) == 2 else torch.channels_last_3d
    w = cl.conv_in.conv.weight
    assert w.is_contiguous(memory_format=fmt) and not w.is_contiguous()
    x, c = torch.randn(2, 2, *shape), torch.tensor([-3.0, 4.0])
    o1, g1 = _out_and_grads(plain, x, c)
    o2, g2 = _out_and_grads(cl, x, c)
    assert o2.is_contiguous()
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    _assert_grads_close(g2, g1, 2e-4)


def test_unet_channels_last_survives_copies_and_loading():
    lay, plain, cl = _pair((8, 8), channels_last=True)
    import copy

    twin = copy.deepcopy(cl)
    twin.load_state_dict(plain.state_dict())
    assert twin.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, c = torch.randn(1, 2, 8, 8), torch.tensor([0.5])
    torch.testing.assert_close(twin(x, c), plain(x, c), rtol=1e-5, atol=1e-5)


def test_unet_channels_last_on_a_1d_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="channels_last needs 2 or 3 spatial axes"):
        build_unet(_layout((16,)), **TINY_UNET, channels_last=True)


def test_fast_path_options_reach_the_unet_from_a_model_config():
    cfg = config_from_dict({"data": {"adapter": "mixture"}, "model": {"backbone": "unet", "options": {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET.items()},
        "channels_last": True, "fused_norm_act": True}}})
    den = build_model(cfg, _layout((8, 8)))
    assert den.net.channels_last and den.net.fused
    assert den.net.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(den.net.norm_out, GroupNormSiLU)


# -- attention through SDPA ------------------------------------------------------------------
def _manual_attention(q, k, v):
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return a @ v


def test_unet_self_attention_equals_manual_softmax_attention():
    lay, plain, _ = _pair((8, 6))
    attn = plain.down[2].attn  # level 1: the first block after the downsampling
    assert attn is not None
    x = torch.randn(2, attn.qkv.in_features, 4, 3)
    h = rearrange(attn.norm(x), "b c ... -> b (...) c")
    q, k, v = rearrange(attn.qkv(h), "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    o = attn.proj(rearrange(_manual_attention(q, k, v), "b h n d -> b n (h d)"))
    want = x + rearrange(o, "b n c -> b c n").reshape(x.shape)
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)


def test_dit_attention_equals_manual_softmax_attention():
    torch.manual_seed(0)
    net = build_dit(_layout((8, 8)), hidden=24, depth=1, num_heads=3)
    _randomize(net)
    blk = net.blocks[0]
    h = torch.randn(2, 16, 24)
    q, k, v = rearrange(blk.qkv(h), "b n (three h d) -> three b h n d", three=3, h=blk.num_heads)
    want = blk.proj(rearrange(_manual_attention(q, k, v), "b h n d -> b n (h d)"))
    torch.testing.assert_close(blk.attention(h), want, rtol=1e-5, atol=1e-5)


def test_no_backbone_computes_attention_by_hand():
    """Attention lives in unet.py and dit.py only, through SDPA; no softmax of q k^T anywhere."""
    src = {p.name: p.read_text() for p in (ROOT / "plugins" / "diffkit_backbones").glob("*.py")}
    manual = [n for n, s in src.items() if re.search(r"softmax\s*\(", s)]
    assert not manual, f"hand-written softmax (attention?) in {manual}: use F.scaled_dot_product_attention"
    sdpa = sorted(n for n, s in src.items() if "scaled_dot_product_attention(" in s)
    assert sdpa == ["dit.py", "unet.py"]
