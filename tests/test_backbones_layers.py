"""Tests of ``diffkit_backbones.layers``: padding to a multiple wraps periodic axes and zero-pads
the others, and crops back exactly."""
from __future__ import annotations

import pytest
import torch

from diffkit_backbones.layers import AxisPad, pad_to_multiple


pytestmark = pytest.mark.usefixtures("one_thread")


def test_padding_wraps_periodic_axes_and_zero_pads_others():
    x = torch.arange(1.0, 16.0).reshape(1, 1, 5, 3)  # axis 0 periodic, axis 1 bounded
    padded, crop = pad_to_multiple(x, (4, 2), (True, False))
    assert padded.shape == (1, 1, 8, 4)
    torch.testing.assert_close(padded[0, 0, :, 0], x[0, 0, [4, 0, 1, 2, 3, 4, 0, 1], 0])  # 1 before, 2 after
    assert padded[0, 0, :, 3].abs().sum() == 0
    torch.testing.assert_close(padded[crop], x)
    assert pad_to_multiple(x, (5, 3), (True, False))[1] is None
    same = AxisPad([(1, 1), (1, 1)], (True, False))(x)
    torch.testing.assert_close(same[0, 0, 0, 1:-1], x[0, 0, -1])  # wrapped row
    torch.testing.assert_close(same[0, 0, 1:-1, 0], torch.zeros(5))  # zero column
    assert same[0, 0, 0, 0] == 0 and same[0, 0, -1, -1] == 0  # corners: wrapped zeros
