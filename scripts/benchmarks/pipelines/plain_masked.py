"""A masked discrete diffusion model as the plain reference loops use it: the backbone network, and the reverse step
written out (MDLM with the log-linear schedule m_t = (1 − ε)·t; T steps, step k from t = 1 − k/T to s = 1 − (k+1)/T),
one sequence at a time, independent of `genalign.generators.masked`.

For a position masked at t: q(v) = p_θ(v | x_t)·(m_t − m_s)/m_t for the real tokens v, q(MASK) = m_s/m_t; unmasked
positions keep their token. Draws are Gumbel-max with one uniform vector per step from the sample's own generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PlainMasked:
    backbone: nn.Module
    vocab: int  # V real tokens; MASK is token V
    eps: float
    length: int

    @classmethod
    def load(cls, folder: str | Path) -> "PlainMasked":
        """The saved model's backbone (loaded through the generator's file format) and its schedule constants."""
        from genalign.generators.masked import MaskedDiffusionGenerator

        saved = MaskedDiffusionGenerator.from_pretrained(folder)
        return cls(saved.backbone.eval(), saved.vocab_size, saved.config.eps, saved.config.length)

    @property
    def mask(self) -> int:
        return self.vocab

    def levels(self, k: int, steps: int) -> tuple[float, float]:
        """(m_t, m_s) of step k."""
        return (1.0 - self.eps) * ((steps - k) / steps), (1.0 - self.eps) * ((steps - k - 1) / steps)

    def uniforms(self, generator: torch.Generator) -> torch.Tensor:
        """One step's uniforms [L, V+1] from the sample's generator."""
        return torch.rand((self.length, self.vocab + 1), generator=generator, dtype=torch.float64)

    def log_p0(self, model: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """log p(x_0 | x_t) over the real tokens, [1, L, V], from ids [1, L] or a soft state [1, L, V+1], with the
        softmax in `dtype` (the engine draws hard steps from float64 probabilities, relaxed ones in float32)."""
        return F.log_softmax(model(x)[..., : self.vocab].to(dtype), dim=-1)

    def step_log_q(self, model: nn.Module, x: torch.Tensor, k: int, steps: int) -> torch.Tensor:
        """log q(x_s | x_t) of a hard state x [1, L], [1, L, V+1] float64 (a point mass where x is unmasked)."""
        m_t, m_s = self.levels(k, steps)
        log_p0 = self.log_p0(model, x, torch.float64)
        mask_entry = torch.full_like(log_p0[..., :1], math.log(m_s / m_t) if m_s > 0 else -math.inf)
        log_q = torch.cat([log_p0 + math.log((m_t - m_s) / m_t), mask_entry], dim=-1)
        point_mass = torch.full_like(log_q, -math.inf).scatter(-1, x[..., None], 0.0)
        return torch.where((x == self.mask)[..., None], log_q, point_mass)

    def hard_step(self, model: nn.Module, x: torch.Tensor, k: int, steps: int, generator: torch.Generator,
                  argmax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One drawn step: (x_s [1, L], log π(x_s | x_t) summed over positions, float64 [1]); `argmax` takes the
        most likely token at every masked position instead (no density: log-prob 0)."""
        log_q = self.step_log_q(model, x, k, steps)
        if argmax:
            return torch.where(x == self.mask, log_q[..., : self.vocab].argmax(-1), x), log_q.new_zeros(1)
        x_s = (log_q + gumbel(self.uniforms(generator))).argmax(-1)
        return x_s, log_q.gather(-1, x_s[..., None]).squeeze(-1).sum(-1)

    def kl(self, model: nn.Module, reference: nn.Module, x: torch.Tensor, k: int, steps: int) -> torch.Tensor:
        """KL of step k between `model` and `reference` at x ([1, L] ids or a soft state [1, L, V+1]): Σ over masked
        positions (weighted by the MASK mass of a soft state) of (m_t − m_s)/m_t · KL(p_θ ‖ p_ref); float64 [1]."""
        m_t, m_s = self.levels(k, steps)
        log_p = self.log_p0(model, x).double()
        with torch.no_grad():
            log_ref = self.log_p0(reference, x).double()
        per_position = (log_p.exp() * (log_p - log_ref)).sum(-1)
        masked = x[..., self.mask].double() if x.is_floating_point() else (x == self.mask).double()
        return (m_t - m_s) / m_t * (masked * per_position).sum(-1)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
