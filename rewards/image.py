"""Hand-crafted image rewards: JPEG (in)compressibility and colourfulness.

All take images as a float tensor ``[B, 3, H, W]`` in [0, 1] (checked by
:class:`rewards.base.Reward`) and return ``[B]`` on the input's device.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .base import Reward, RewardError, register_reward

__all__ = ["jpeg_size_kb", "JpegCompressibility", "JpegIncompressibility", "Colorfulness"]


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size of each image saved as JPEG, in kilobytes (bytes / 1000).

    Args:
        images: ``[B, 3, H, W]`` float in [0, 1], any device.
        quality: PIL JPEG quality (1-100).

    Returns:
        ``[B]`` float32 on ``images.device``.
    """
    # Quantise exactly as an image would be saved to disk, so the reward is
    # the size of the picture the user actually sees.
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        # A uint8 [H, W, 3] array is RGB to PIL (the `mode=` argument is deprecated).
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class _JpegSizeReward(Reward):
    """Shared JPEG-size machinery; subclasses pick the sign."""

    modality = "image"
    kind = "instance"
    differentiable = False
    _sign: float = 1.0

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise RewardError(
                f"reward '{self.name}' got quality={quality!r}; use an integer JPEG quality in "
                f"1..100 (DDPO uses 95)"
            )
        self.quality = quality

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B]`` signed JPEG size in kB."""
        return self._sign * jpeg_size_kb(outputs, self.quality)

    def extra_repr(self) -> str:
        return f"quality={self.quality}, " + super().extra_repr()


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSizeReward):
    """DDPO compressibility: ``-(JPEG size in kB)``; smaller files score higher."""

    _sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSizeReward):
    """DDPO incompressibility: ``+(JPEG size in kB)``; larger files score higher."""

    _sign = 1.0


@register_reward("colorfulness")
class Colorfulness(Reward):
    """Differentiable Hasler & Süsstrunk (2003) colourfulness on [0, 1] images.

    Per image, with ``rg = R - G`` and ``yb = (R + G) / 2 - B`` over all pixels::

        M = sqrt(var(rg) + var(yb) + eps) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2 + eps)

    using population variance. Because inputs are in [0, 1] rather than
    [0, 255], values are 255x smaller than in the paper.
    """

    modality = "image"
    kind = "instance"
    differentiable = True

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        # sqrt has an infinite derivative at 0, and a grey image has zero
        # spread and zero mean opponent colour: eps keeps gradients finite.
        if not eps > 0:
            raise RewardError(
                f"reward 'colorfulness' got eps={eps!r}; use a small positive value such as 1e-8 "
                f"so gradients stay finite on grey images"
            )
        self.eps = float(eps)

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B]`` colourfulness."""
        # Half-precision variances of small differences lose most of their bits.
        x = outputs if outputs.dtype in (torch.float32, torch.float64) else outputs.float()
        r, g, b = x.flatten(2).unbind(dim=1)  # each [B, H*W]
        rg = r - g
        yb = 0.5 * (r + g) - b
        spread = torch.sqrt(
            rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0) + self.eps
        )
        offset = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2 + self.eps)
        return spread + 0.3 * offset

    def extra_repr(self) -> str:
        return f"eps={self.eps}, " + super().extra_repr()
