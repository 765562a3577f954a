"""The training step keeps its arithmetic under layout changes (CPU ranks over gloo)."""

from __future__ import annotations

import torch
from steps import compare_steps


def test_channels_last_gives_the_same_losses_and_weights():
    eager, nhwc = compare_steps("gloo", "channels_last", steps=3)
    for rank in range(2):
        torch.testing.assert_close(nhwc[rank][0], eager[rank][0], rtol=1e-4, atol=1e-5)
        for a, b in zip(nhwc[rank][1], eager[rank][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
