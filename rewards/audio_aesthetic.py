"""Text-free aesthetic reward for audio: an improved-aesthetic-predictor MLP on CLAP audio embeddings.

``clap_aesthetic`` is ``clip_aesthetic``'s recipe for audio: the LAION head layout
(:class:`rewards.clip_rewards.AestheticHead`, keys ``layers.0.weight`` ... ``layers.7.bias``) applied to the
unit-norm CLAP audio embedding. The CLAP side is a held :class:`rewards.audio.ClapScore`, so loading, the
differentiable feature pipeline (resampling, log-mel) and the waveform checks are exactly ``clap_score``'s. In the
tones world the head comes from ``genalign.worlds.tones_aesthetic.train_aesthetic_head`` (the committed one is
``genalign/worlds/assets/tones/aesthetic``) and scores on its rule's 1-10 scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .audio import ClapScore
from .base import Reward, RewardError, register_reward
from .clip_rewards import (
    CLIP_AESTHETIC_HEAD_FILENAME,
    AestheticHead,
    _fetch_file,
    _freeze,
    _load_error,
    _load_head_state,
)

__all__ = ["ClapAesthetic"]


@register_reward("clap_aesthetic")
class ClapAesthetic(Reward):
    """Aesthetic score of waveforms: ``head(clap.embed_audio(waveforms))`` -> ``[B]``; prompts are ignored.

    Example::

        reward = ClapAesthetic(model="genalign/worlds/assets/tones/clap",
                               head="genalign/worlds/assets/tones/aesthetic", sampling_rate=16_000)
        reward(waveforms).rewards      # [B], differentiable w.r.t. the waveforms
    """

    modality = "audio"
    kind = "instance"
    differentiable = True

    def __init__(
        self,
        model: str | os.PathLike,
        head: str | os.PathLike,
        sampling_rate: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        """
        Args:
            model: hub id or local folder of a transformers CLAP checkpoint, or a laion-clap ``.pt`` file
                (anything ``clap_score`` takes).
            head: the head's weights: a ``.safetensors`` file with the AestheticHead keys (as
                ``genalign.worlds.tones_aesthetic.save_aesthetic_head`` writes), a torch state-dict file with
                the same keys, a folder holding ``aesthetic_head.safetensors``, or a hub repo holding that file.
            sampling_rate: required; rate in Hz of the waveforms you will score (16000 in the tones world).
            device: where the CLAP and the head run; None keeps them on the CPU. Rewards are returned on the
                waveforms' device.
        """
        super().__init__()
        if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int) or sampling_rate <= 0:
            raise RewardError(
                f"reward '{self.name}' needs sampling_rate= the rate in Hz of the waveforms you will score "
                f"(16000 in the tones world); got {sampling_rate!r}"
            )
        self.model_id, self.head_source = str(model), str(head)
        try:
            self.clap = ClapScore(model=model, sampling_rate=sampling_rate)
        except RewardError as exc:
            raise RewardError(f"reward '{self.name}' could not build its CLAP: {exc}") from exc
        # The held ClapScore's waveform checks then name this reward in their messages.
        self.clap.name = self.name
        try:
            head_file = _fetch_file(self.head_source, [CLIP_AESTHETIC_HEAD_FILENAME], False)
            state = _load_head_state(head_file)
        except Exception as exc:
            raise _load_error(
                "CLAP aesthetic head", self.head_source, "head", f"/path/to/{CLIP_AESTHETIC_HEAD_FILENAME}", exc
            ) from exc
        embed_dim = int(self.clap.model.config.projection_dim)
        self.head = AestheticHead.from_state_dict(
            state, embed_dim, head_file, f"the CLAP audio tower of {self.model_id!r}",
            "pass the CLAP the head was trained on, or train a head on this CLAP's audio embeddings "
            "(genalign.worlds.tones_aesthetic.train_aesthetic_head)",
        )
        _freeze(self.head, None)
        if device is not None:
            self.to(device)

    @property
    def sampling_rate(self) -> int:
        """Rate in Hz of the waveforms this reward scores."""
        return self.clap.sampling_rate

    def train(self, mode: bool = True) -> ClapAesthetic:
        """Keep the CLAP (BatchNorm) and the head (dropout) in eval mode whatever the caller asks."""
        super().train(mode)
        self.clap.train(False)
        self.head.eval()
        return self

    def validate_outputs(self, outputs: Any) -> int:
        """``clap_score``'s checks: float ``[B, T]`` / ``[B, C, T]``, non-empty, finite, on the [-1, 1] scale."""
        return self.clap.validate_outputs(outputs)

    def score(self, outputs: torch.Tensor, conditions: Sequence[str] | None) -> torch.Tensor:
        """``[B, T]`` or ``[B, C, T]`` waveforms -> ``[B]`` float32 aesthetic score on ``outputs.device``."""
        embeddings = self.clap.embed_audio(outputs)
        head_device = next(self.head.parameters()).device
        return self.head(embeddings.to(head_device)).float().to(outputs.device)

    def extra_repr(self) -> str:
        return (
            f"model={self.model_id!r}, head={self.head_source!r}, sampling_rate={self.sampling_rate}, "
            + super().extra_repr()
        )
