"""Masked discrete diffusion (MDLM-style) over any token vocabulary, as a `Generator` of modality "sequence".

The model family for DNA and proteins. Vocabulary: V real tokens (ids 0..V−1, `config.alphabet`) plus one
MASK token with id V. A backbone maps a state x_t ([B, L] ids, or soft one-hot [B, L, V+1]) to logits
[B, L, V+1]; the MASK logit is ignored (set to −∞), so p_θ(x_0 | x_t) lives on the real tokens.

Forward process (log-linear schedule): every token is independently replaced by MASK with probability
m_t = (1 − ε)·t, t ∈ [0, 1].

Reverse process with T steps, t_k = 1 − k/T, step k going from t = t_k to s = t_{k+1}. For a position masked
at t:
    q(v)    = p_θ(x_0 = v | x_t)·(m_t − m_s)/m_t   for real v,
    q(MASK) = m_s/m_t;
positions already unmasked are carried over unchanged (q is a point mass on their token). p_θ = softmax of
logits/τ (logit temperature τ). By default the last step (s = 0) takes the argmax of p_θ instead of sampling, so
it has no density (`Trajectory.trainable` is False there, its log-prob is recorded as 0); `final_step="sample"`
draws it like every other step, so the trajectory's log-probability is that of the whole path to x_0 (what
trajectory-level objectives such as relative trajectory balance need).

The log-probability of a step is log π(x_s | x_t) = Σ_{i masked at t} log q_i(x_{s,i}), computed in float64
from the model's logits both while sampling and in `step_log_prob` (the same code), so an unchanged model
re-evaluates a trajectory to the recorded values.

Outputs: `sample` gives [B, L] long ids in 0..V−1. `sample_differentiable` (DRAKES's Gumbel-softmax relaxation)
gives straight-through one-hot floats [B, L, V]: exactly one-hot in value, differentiable in gradient; sequence
rewards accept both forms.

Re-evaluation in a batch of a different size (chunks, minibatches) agrees to float32 rounding of the backbone
(~1e-7 relative), since CPU/GPU kernels round differently per batch shape; in the same batch it is exact.

Conditioning: the model is unconditional. `sample` accepts `Conditions` or a list of texts of any content
and ignores the texts (they are kept in the Rollout, so per-condition statistics such as DDPO's per-prompt
buffers still have keys); one sample is drawn per condition.

No time input: for an absorbing (masking) process the posterior p(x_0 | x_t) does not depend on t given the
masked state (Ou et al. 2024; MDLM trains time-independent models too), so the backbones see x_t only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from genalign.attention import AttentionBackend, SwitchableAttention, attention, set_attention_backend
from genalign.generators.base import (
    Conditions,
    ModelLoadError,
    Rollout,
    Trajectory,
    adapter_layers,
    adapters_disabled,
    per_sample_generators,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "genalign.MaskedDiffusionGenerator"


class MaskedModelLoadError(ModelLoadError):
    """A folder that cannot be loaded as a masked diffusion model; the message says how to fix it."""


# ----------------------------------------------------------------------------------- configuration


@dataclass
class MaskedDiffusionConfig:
    """Everything needed to rebuild a masked diffusion model (saved as config.json).

    Attributes:
        alphabet: the V real tokens, a string of characters ("ACGT") or a list of token strings.
        length: the sequence length L the model is trained and sampled at (the transformer's position table).
        backbone: "cnn" (dilated 1-D CNN), "transformer", or "proteinmpnn" (inverse folding conditioned on a
            protein backbone structure, `genalign.generators.proteinmpnn`; alphabet = the 20 amino acids,
            num_layers = its encoder and decoder layers, lengths come from the backbones).
        hidden_size: channels / model width.
        num_layers: residual blocks.
        kernel_size: CNN kernel width (odd).
        dilation_cycle: CNN dilations are 2**(i mod dilation_cycle) for block i.
        num_heads: transformer attention heads.
        mlp_ratio: transformer feed-forward width / hidden_size.
        num_neighbors: proteinmpnn: nearest neighbours per residue in its structure graph (k).
        eps: the schedule's ε (m_1 = 1 − ε).
    """

    alphabet: str | list[str] = "ACGT"
    length: int = 100
    backbone: Literal["cnn", "transformer", "proteinmpnn"] = "cnn"
    hidden_size: int = 128
    num_layers: int = 8
    kernel_size: int = 9
    dilation_cycle: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    eps: float = 1e-3
    num_neighbors: int = 48

    def __post_init__(self) -> None:
        tokens = list(self.alphabet)
        if not tokens or len(set(tokens)) != len(tokens):
            raise ValueError(f"alphabet must list distinct tokens (e.g. 'ACGT'); got {self.alphabet!r}")
        if self.backbone not in ("cnn", "transformer", "proteinmpnn"):
            raise ValueError(f"backbone must be 'cnn', 'transformer' or 'proteinmpnn'; got {self.backbone!r}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the CNN keeps the length; got {self.kernel_size}")
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1); got {self.eps}")

    @property
    def tokens(self) -> list[str]:
        return list(self.alphabet)

    @property
    def vocab_size(self) -> int:
        """V, the number of real tokens (MASK excluded)."""
        return len(self.tokens)


@dataclass
class MaskedSamplingOptions:
    """How to sample.

    Attributes:
        num_inference_steps: T reverse steps from t = 1 to 0 (the last one is the argmax).
        temperature: logit temperature τ, p_θ = softmax(logits/τ).
        length: sequence length L (None: the model's `config.length`).
        log_prob_reduction: a step's log-probability summed over the L positions ("sum", the true density) or
            averaged over them ("mean", the per-position scale that DDPO's ε = 1e-4 is calibrated for).
        final_step: "argmax" (the last step takes the most likely tokens; no density) or "sample" (drawn, with
            its density: every step of the trajectory is then trainable).
    """

    num_inference_steps: int = 100
    temperature: float = 1.0
    length: int | None = None
    log_prob_reduction: Literal["sum", "mean"] = "sum"
    final_step: Literal["argmax", "sample"] = "argmax"


@dataclass(frozen=True)
class LogLinearSchedule:
    """m_t = (1 − ε)·t, the probability that a token is masked at time t ∈ [0, 1]."""

    eps: float = 1e-3

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * t

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The ELBO weight −α'_t/(1 − α_t) with α_t = 1 − m_t: (1 − ε)/((1 − ε)t), which is exactly 1/t for
        every ε (ε rescales the rate and the masked fraction alike)."""
        return (1.0 - self.eps) / self.mask_prob(t)


# ----------------------------------------------------------------------------------- backbones


def embed_tokens(x: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
    """Token ids [B, L] → [B, L, H] by lookup; soft one-hot [B, L, V+1] → [B, L, H] as a matrix product with
    the embedding weight (equal to the lookup on hard one-hots, differentiable in the probabilities)."""
    if x.is_floating_point():
        return x.to(embedding.weight.dtype) @ embedding.weight
    return embedding(x)


def dilated_conv1d(conv: nn.Conv1d, x: torch.Tensor, dilation: int) -> torch.Tensor:
    """`conv` (dilation 1, odd kernel, 'same' padding) applied with `dilation` to x [B, C, L] → [B, C', L].

    A dilation-d convolution is an undilated one on each of the d interleaved subsequences x[..., r::d], so we
    fold those into the batch. Why not nn.Conv1d(dilation=d): peft's LoRA for convolutions drops the dilation
    in its adapter branch (huggingface/peft#3697, unfixed in 0.21), which breaks LoRA on dilated convs; an
    undilated conv it adapts correctly. Zero padding to a multiple of d matches the dilated conv's zero padding.
    """
    if dilation == 1:
        return conv(x)
    B, C, L = x.shape
    folded_length = -(-L // dilation)
    x = F.pad(x, (0, folded_length * dilation - L))
    x = x.view(B, C, folded_length, dilation).permute(0, 3, 1, 2).reshape(B * dilation, C, folded_length)
    y = conv(x)
    y = y.view(B, dilation, -1, folded_length).permute(0, 2, 3, 1).reshape(B, -1, folded_length * dilation)
    return y[..., :L]


class DilatedConvBlock(nn.Module):
    """h + pointwise_conv(GELU(dilated_conv(LayerNorm(h)))) on [B, L, H]; length-preserving."""

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        self.norm = nn.LayerNorm(hidden_size)
        self.dilated_conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, padding=(kernel_size - 1) // 2)
        self.pointwise_conv = nn.Conv1d(hidden_size, hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = dilated_conv1d(self.dilated_conv, self.norm(h).transpose(1, 2), self.dilation)
        y = self.pointwise_conv(F.gelu(y))
        return h + y.transpose(1, 2)


class DilatedConvNet(nn.Module):
    """Dilated residual 1-D CNN denoiser: x_t [B, L] ids or [B, L, V+1] soft one-hot → logits [B, L, V+1].

    Dilations 2**(i mod dilation_cycle) widen the receptive field exponentially per cycle. LayerNorm (never
    BatchNorm) keeps every sample's output independent of the rest of its batch, which chunked sampling and
    exact log-prob re-evaluation rely on. LoRA targets: `dilated_conv`, `pointwise_conv`, `to_logits`.
    """

    def __init__(self, num_tokens: int, hidden_size: int, num_layers: int, kernel_size: int,
                 dilation_cycle: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(num_tokens, hidden_size)
        self.blocks = nn.ModuleList(
            DilatedConvBlock(hidden_size, kernel_size, 2 ** (i % dilation_cycle)) for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.to_logits = nn.Linear(hidden_size, num_tokens)
        # Start from uniform predictions (loss ln V), as MDLM zero-initialises its output layer.
        nn.init.zeros_(self.to_logits.weight)
        nn.init.zeros_(self.to_logits.bias)

    def forward(self, x: torch.Tensor, conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`conditioning` is accepted for the common backbone signature; this model is unconditional."""
        h = embed_tokens(x, self.token_embedding)
        for block in self.blocks:
            h = block(h)
        return self.to_logits(self.norm(h))


class TransformerBlock(SwitchableAttention, nn.Module):
    """Pre-LayerNorm bidirectional self-attention and GELU MLP on [B, L, H]; the attention runs on
    `attention_backend` (`genalign.attention`). LoRA targets: `to_q`, `to_k`, `to_v`, `to_out`, `ff_in`, `ff_out`."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(hidden_size, hidden_size)
        self.to_v = nn.Linear(hidden_size, hidden_size)
        self.to_out = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.ff_in = nn.Linear(hidden_size, mlp_ratio * hidden_size)
        self.ff_out = nn.Linear(mlp_ratio * hidden_size, hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, L, H = h.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, H] → [B, heads, L, H/heads]
            return t.view(B, L, self.num_heads, H // self.num_heads).transpose(1, 2)

        n = self.attn_norm(h)
        attended = attention(heads(self.to_q(n)), heads(self.to_k(n)), heads(self.to_v(n)),
                             backend=self.attention_backend)
        h = h + self.to_out(attended.transpose(1, 2).reshape(B, L, H))
        return h + self.ff_out(F.gelu(self.ff_in(self.mlp_norm(h))))


class MaskedTransformer(nn.Module):
    """Bidirectional transformer denoiser with learned positions (up to `max_length`): x_t [B, L] ids or
    [B, L, V+1] soft one-hot → logits [B, L, V+1]."""

    def __init__(self, num_tokens: int, max_length: int, hidden_size: int, num_layers: int, num_heads: int,
                 mlp_ratio: int) -> None:
        super().__init__()
        # Token and position embeddings on one scale: with nn.Embedding's N(0, 1), tokens drown the N(0, 0.02)
        # positions and attention cannot tell neighbours apart (measured: a 4-block model stayed at the ln V
        # plateau on the Markov grammar; with both at 0.02 it learned in the same budget).
        self.token_embedding = nn.Embedding(num_tokens, hidden_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.position_embedding = nn.Parameter(torch.randn(max_length, hidden_size) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.to_logits = nn.Linear(hidden_size, num_tokens)
        nn.init.zeros_(self.to_logits.weight)
        nn.init.zeros_(self.to_logits.bias)

    def forward(self, x: torch.Tensor, conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`conditioning` is accepted for the common backbone signature; this model is unconditional."""
        length = x.shape[1]
        if length > self.position_embedding.shape[0]:
            raise ValueError(f"sequence length {length} exceeds the transformer's {self.position_embedding.shape[0]} "
                             "positions; sample at most config.length")
        h = embed_tokens(x, self.token_embedding) + self.position_embedding[:length]
        for block in self.blocks:
            h = block(h)
        return self.to_logits(self.norm(h))


def build_backbone(config: MaskedDiffusionConfig) -> nn.Module:
    """The backbone `config.backbone` names, freshly initialised (seed torch beforehand for reproducibility)."""
    num_tokens = config.vocab_size + 1
    if config.backbone == "proteinmpnn":
        from genalign.generators.proteinmpnn import ProteinMPNNDenoiser

        return ProteinMPNNDenoiser(config.alphabet, config.hidden_size, config.num_layers, config.num_layers,
                                   config.num_neighbors)
    if config.backbone == "cnn":
        return DilatedConvNet(num_tokens, config.hidden_size, config.num_layers, config.kernel_size,
                              config.dilation_cycle)
    return MaskedTransformer(num_tokens, config.length, config.hidden_size, config.num_layers, config.num_heads,
                             config.mlp_ratio)


# ----------------------------------------------------------------------------------- the reverse step


def denoising_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p_θ(x_0 | x_t) = log_softmax(logits/τ) over the real tokens; the MASK entry (last) is −∞.

    Args:
        logits: [B, L, V+1] backbone output (its MASK column is ignored).
    Returns:
        [B, L, V+1] in the dtype of `logits`.
    """
    real = F.log_softmax(logits[..., :-1] / temperature, dim=-1)
    return torch.cat([real, torch.full_like(logits[..., -1:], -math.inf)], dim=-1)


def masked_transition_log_probs(log_p0: torch.Tensor, m_t: torch.Tensor, m_s: torch.Tensor) -> torch.Tensor:
    """log q(x_s | x_t) for a position masked at t: log p_θ(v) + log((m_t − m_s)/m_t) for real v, log(m_s/m_t) for
    MASK (−∞ when s = 0). Normalised exactly, since Σ_v p_θ(v) = 1.

    Args:
        log_p0: [B, L, V+1] from `denoising_log_probs`.
        m_t, m_s: [B] masking probabilities at t and s < t.
    Returns:
        [B, L, V+1] in the dtype of `log_p0`.
    """
    m_t = m_t.to(log_p0.dtype)[:, None, None]
    m_s = m_s.to(log_p0.dtype)[:, None, None]
    real = log_p0[..., :-1] + torch.log((m_t - m_s) / m_t)
    return torch.cat([real, torch.log(m_s / m_t).expand_as(log_p0[..., -1:])], dim=-1)


def carry_over(log_q: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Make unmasked positions of x_t [B, L] a point mass on their token (log q = 0 there, −∞ elsewhere), so a
    sampled step can never change them and they add exactly 0 to a step's log-probability. [B, L, V+1]."""
    point_mass = torch.full_like(log_q, -math.inf).scatter(-1, x_t[..., None], 0.0)
    return torch.where((x_t != mask_id)[..., None], point_mass, log_q)


def _uniforms(shape: tuple[int, ...], generators: list[torch.Generator] | None, batch: int,
              device: torch.device) -> torch.Tensor:
    """[batch, *shape] float64 uniforms: one draw per sample from its own generator (batching-independent), or
    from the global RNG without seeds."""
    if generators is None:
        return torch.rand((batch, *shape), dtype=torch.float64, device=device)
    return torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in generators]).to(device)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


# ----------------------------------------------------------------------------------- the MDLM loss

_MIN_TIME = 1e-3  # smallest training time: the ELBO weight 1/t stays ≤ 1000 (MDLM's sampling_eps)


def mdlm_loss(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    schedule: LogLinearSchedule,
    mask_id: int,
    *,
    t: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MDLM's continuous-time negative ELBO, in nats per token.

        loss = 1/(B·L) · Σ_b w(t_b) · Σ_{i masked in x_t,b} −log p_θ(x_{0,bi} | x_t,b),   w(t) = −α'_t/(1 − α_t) = 1/t

    Normalised per token as MDLM does (divided by all B·L tokens, unmasked ones contributing 0), so it is an
    upper bound on −log p(x_0)/L averaged over the batch.

    Args:
        logits_fn: x_t [B, L] → logits [B, L, V+1] (e.g. `MaskedDiffusionGenerator.logits`).
        x0: [B, L] clean token ids in 0..V−1.
        schedule: the masking schedule.
        mask_id: the MASK token id (V).
        t: [B] times in (0, 1]; default stratified (antithetic) over the batch, t_b = δ + (1 − δ)·((u + b/B) mod 1)
           with δ = `_MIN_TIME` keeping the 1/t weight bounded; one shared u spreads the batch over (0, 1],
           which lowers the loss's variance, as in MDLM.
        masked: [B, L] bool positions to mask; default each independently with probability m_t.
        generator: CPU RNG for t and the mask (seeded runs).
    Returns:
        scalar loss (differentiable through `logits_fn`).
    """
    B, L = x0.shape
    device = x0.device
    if t is None:
        u = torch.rand((), generator=generator).to(device)
        t = _MIN_TIME + (1.0 - _MIN_TIME) * ((u + torch.arange(B, device=device) / B) % 1.0)
    if masked is None:
        masked = torch.rand((B, L), generator=generator).to(device) < schedule.mask_prob(t)[:, None]
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    nll = -denoising_log_probs(logits_fn(x_t).float()).gather(-1, x0[..., None]).squeeze(-1)  # [B, L]
    weighted = schedule.loss_weight(t.float())[:, None] * torch.where(masked, nll, torch.zeros_like(nll))
    return weighted.sum() / (B * L)


# ----------------------------------------------------------------------------------- the generator


class MaskedDiffusionGenerator:
    """A masked discrete diffusion model as a stochastic policy over token sequences (see the module docstring).

    Build it with `from_config(config)` (fresh weights), `from_pretrained(folder)`, or directly from any backbone
    mapping [B, L] ids / [B, L, V+1] soft one-hots to [B, L, V+1] logits. Only the backbone is trainable.
    """

    modality = "sequence"

    def __init__(self, backbone: nn.Module, config: MaskedDiffusionConfig) -> None:
        self.backbone = backbone
        self.config = config
        self.schedule = LogLinearSchedule(config.eps)
        # Forward passes go through these (distributed wrappers once a trainer has prepared them).
        self._forward_modules: dict[str, nn.Module] = {"backbone": backbone}
        self._reference_copy: nn.Module | None = None
        self._use_reference_copy = False

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_config(cls, config: MaskedDiffusionConfig) -> "MaskedDiffusionGenerator":
        """Fresh weights (seed torch beforehand for reproducible initialisation)."""
        return cls(build_backbone(config), config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: torch.device | str | None = None,
                        torch_dtype: torch.dtype | None = None) -> "MaskedDiffusionGenerator":
        """Load a folder written by `save_pretrained` (config.json + model.safetensors), optionally cast.

        "proteinmpnn:<weights>" (e.g. "proteinmpnn:v_48_020", "proteinmpnn:soluble/v_48_020") loads the original
        ProteinMPNN weights shipped in the `proteinmpnn` package as a masked diffusion model over the 20 amino
        acids (`genalign.generators.proteinmpnn`); its conditions name protein backbones."""
        if str(folder).startswith("proteinmpnn:"):
            from genalign.generators.proteinmpnn import PROTEIN_ALPHABET, ProteinMPNNDenoiser

            try:
                backbone = ProteinMPNNDenoiser.from_package(str(folder)[len("proteinmpnn:"):])
            except (FileNotFoundError, ImportError) as error:
                raise MaskedModelLoadError(f"cannot load '{folder}': {error}") from None
            config = MaskedDiffusionConfig(alphabet=PROTEIN_ALPHABET, length=256, backbone="proteinmpnn",
                                           hidden_size=backbone.mpnn.hidden_dim,
                                           num_layers=len(backbone.mpnn.decoder_layers),
                                           num_neighbors=backbone.mpnn.features.top_k)
            return cls(backbone, config).to(device, torch_dtype)
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise MaskedModelLoadError(
                f"{folder} is not a masked diffusion model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                "train one with scripts/pretrain_masked.py or write one with MaskedDiffusionGenerator.save_pretrained")
        try:
            saved = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise MaskedModelLoadError(f"{config_path} is not valid JSON ({error}); re-save the model with "
                                       "save_pretrained") from None
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
            raise MaskedModelLoadError(f"{config_path} was not written by MaskedDiffusionGenerator.save_pretrained "
                                       f"(format {saved.get('format') if isinstance(saved, dict) else None!r}); "
                                       "point to a folder it wrote")
        known = {f.name for f in fields(MaskedDiffusionConfig)}
        config = MaskedDiffusionConfig(**{k: v for k, v in saved.items() if k in known})
        generator = cls.from_config(config)
        try:
            generator.backbone.load_state_dict(load_file(str(weights_path)))
        except Exception as error:  # safetensors' header errors and torch's key/shape mismatches alike
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MaskedModelLoadError(f"{weights_path} does not hold weights for the model in {CONFIG_NAME} "
                                       f"({first_line}); re-save the model with save_pretrained") from None
        return generator.to(device, torch_dtype)

    def save_adapter(self, folder: str | Path) -> Path:
        """This family's native form of a fine-tuned model is the whole (small) model with the LoRA adapters
        merged in: the folder loads with `from_pretrained`."""
        return self.save_pretrained(folder)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json and model.safetensors into `folder` (created if needed). LoRA adapters, if any, are
        merged into a copy first, so the folder always loads as a plain model with the weights in use now."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in _merged(self.backbone).state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps({"format": _FORMAT, "version": 1, **asdict(self.config)},
                                                     indent=2) + "\n")
        return folder

    # ------------------------------------------------------------------ device and modules
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """V, the number of real tokens."""
        return self.config.vocab_size

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "MaskedDiffusionGenerator":
        for module in (self.backbone, self._reference_copy):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone}

    def set_training_modules(self, modules: dict[str, nn.Module]) -> None:
        unknown = set(modules) - {"backbone"}
        if unknown:
            raise KeyError(f"unknown training modules {sorted(unknown)}; this generator trains only 'backbone'")
        self._forward_modules.update(modules)

    def keep_reference_copy(self) -> None:
        """Freeze a copy of the backbone for `reference()` under full fine-tuning (nothing to do under LoRA)."""
        if adapter_layers(self.trainable_modules()):
            return
        self._reference_copy = copy.deepcopy(self.backbone).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Compute with the pretrained weights: the frozen copy if one was kept, else LoRA adapters disabled."""
        if self._reference_copy is not None:
            previous, self._use_reference_copy = self._use_reference_copy, True
            try:
                yield
            finally:
                self._use_reference_copy = previous
        else:
            with adapters_disabled(self.trainable_modules()):
                yield

    def set_attention_backend(self, backend: AttentionBackend) -> dict[str, str]:
        """The transformer backbone's attention runs on `backend` (`genalign.attention`). The CNN backbone has no
        attention layers; neither has ProteinMPNN, whose encoder and decoder sum MLP messages over each
        residue's nearest neighbours (no softmax over keys), so it keeps its own implementation unchanged."""
        return set_attention_backend({"backbone": self.backbone, "reference_copy": self._reference_copy}, backend)

    def logits(self, x_t: torch.Tensor, conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Backbone logits [B, L, V+1] for x_t: [B, L] ids (MASK = V) or soft one-hot [B, L, V+1], given the
        samples' conditioning tensors (e.g. a protein backbone's coordinates; none for unconditional models)."""
        module = self._reference_copy if self._use_reference_copy else self._forward_modules["backbone"]
        return module(x_t, conditioning) if conditioning else module(x_t)

    # ------------------------------------------------------------------ tokens
    def decode(self, ids: torch.Tensor) -> list[str]:
        """[B, L] ids (or [B, L, V] one-hots) → B strings; tokens joined by "" for a character alphabet, else " "."""
        if ids.is_floating_point():
            ids = ids.argmax(-1)
        tokens = self.config.tokens
        separator = "" if all(len(token) == 1 for token in tokens) else " "
        return [separator.join(tokens[i] for i in row) for row in ids.tolist()]

    # ------------------------------------------------------------------ sampling
    def default_options(self) -> MaskedSamplingOptions:
        return MaskedSamplingOptions()

    def trainable_steps(self, options: MaskedSamplingOptions) -> torch.Tensor:
        """[T] bool: every step but the last when it is the argmax (which has no density); every step when
        `final_step="sample"`."""
        last = options.num_inference_steps - (options.final_step == "argmax")
        return torch.arange(options.num_inference_steps) < last

    def _masking_levels(self, step_index: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """m_t, m_s [B] float64 for step k: t = 1 − k/T, s = 1 − (k+1)/T (one formula for sampling and
        re-evaluation, so both see bit-identical numbers)."""
        k = step_index.to(torch.float64)
        return (self.schedule.mask_prob((num_steps - k) / num_steps),
                self.schedule.mask_prob((num_steps - k - 1) / num_steps))

    def transition_log_probs(self, x_t: torch.Tensor, step_index: torch.Tensor, options: MaskedSamplingOptions,
                             conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """log q(x_s,i = v | x_t) of step `step_index` [B] for every position and token, [B, L, V+1] float64:
        the masked-position distribution where x_t [B, L] is MASK, a point mass on the token elsewhere.
        Differentiable with respect to the backbone."""
        log_p0 = denoising_log_probs(self.logits(x_t, conditioning).to(torch.float64), options.temperature)
        m_t, m_s = self._masking_levels(step_index, options.num_inference_steps)
        return carry_over(masked_transition_log_probs(log_p0, m_t, m_s), x_t, self.mask_id)

    def _hard_step(self, x_t: torch.Tensor, k: int, options: MaskedSamplingOptions,
                   generators: list[torch.Generator] | None, record: bool,
                   conditioning: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampled step k: x_s [B, L] and (if `record`) log π(x_s | x_t) [B] float64 (0 on the argmax step)."""
        B, L = x_t.shape
        log_q = self.transition_log_probs(x_t, torch.full((B,), k, device=x_t.device), options, conditioning)
        if k == options.num_inference_steps - 1 and options.final_step == "argmax":
            # Only still-masked positions take the argmax: padding (see `_initial_state`) stays as it is.
            x_s = torch.where(x_t == self.mask_id, log_q[..., : self.mask_id].argmax(-1), x_t)
            return x_s, (torch.zeros(B, dtype=torch.float64, device=x_t.device) if record else None)
        # Gumbel-max: an exact draw from q per position.
        x_s = (log_q + _gumbel(_uniforms((L, self.mask_id + 1), generators, B, x_t.device))).argmax(-1)
        return x_s, (_reduce(log_q.gather(-1, x_s[..., None]).squeeze(-1), options, conditioning) if record else None)

    @torch.no_grad()
    def log_likelihood_bound(self, ids: torch.Tensor, conditions: Conditions | Sequence[str] | None = None, *,
                             num_draws: int = 16, seed: int = 0) -> torch.Tensor:
        """The ELBO of each sequence under this model, a lower bound on log p(x_0) in nats per sequence:
        −E_t[w(t)·Σ_{i masked} −log p_θ(x_0,i | x_t)] (MDLM's bound; `mdlm_loss` is its per-token batch mean),
        estimated with `num_draws` stratified times t per sequence and seeded masks. Padding (conditions'
        "valid") is never masked. ids [B, L] long (or one-hots [B, L, V]) → [B] float64."""
        ids = (ids.argmax(-1) if ids.is_floating_point() else ids).to(self.device)
        B, L = ids.shape
        self.check_length(L)
        conditions = self.prepare_conditions(conditions if conditions is not None else [""] * B)
        conditioning = self._conditioning(conditions)
        valid = conditioning.get("valid")
        rng = torch.Generator().manual_seed(seed)
        u = torch.rand((), generator=rng, dtype=torch.float64)
        total = torch.zeros(B, dtype=torch.float64, device=self.device)
        for draw in range(num_draws):
            t = torch.full((B,), _MIN_TIME + (1.0 - _MIN_TIME) * float((u + draw / num_draws) % 1.0),
                           dtype=torch.float64)
            masked = (torch.rand((B, L), generator=rng, dtype=torch.float64) < self.schedule.mask_prob(t)[:, None])
            masked = masked.to(self.device) & (True if valid is None else valid.to(self.device).bool())
            x_t = torch.where(masked, torch.full_like(ids, self.mask_id), ids)
            log_p = denoising_log_probs(self.logits(x_t, conditioning).double()).gather(-1, ids[..., None])[..., 0]
            total += self.schedule.loss_weight(t).to(self.device) * torch.where(masked, log_p, 0.0).sum(-1)
        return total / num_draws

    # ------------------------------------------------------------------ step by step (inference-time search)
    def initial_state(self, conditions: Conditions, options: MaskedSamplingOptions | None = None) -> torch.Tensor:
        """x_1 [B, L] long for prepared `conditions` (see `prepare_conditions`): all MASK but padding."""
        conditions, options, length = self._resolve(conditions, options)
        conditioning = self._conditioning(conditions)
        if "valid" in conditioning:
            length = conditioning["valid"].shape[1]
        return self._initial_state(len(conditions), length, conditioning)

    @torch.no_grad()
    def reverse_step(self, x_t: torch.Tensor, step_index: int, options: MaskedSamplingOptions,
                     conditions: Conditions, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """One step k = `step_index` of `sample` from x_t [B, L]: x_s [B, L] long (the argmax on the last step).
        `generators` (one per row, from `per_sample_generators`) give the same draws as `sample` with those
        seeds; rows may be reordered or copied between steps (resampling) with the generators kept per row."""
        return self._hard_step(x_t, step_index, options, generators, False, self._conditioning(conditions))[0]

    @torch.no_grad()
    def predict_x0(self, x_t: torch.Tensor, options: MaskedSamplingOptions, conditions: Conditions) -> torch.Tensor:
        """The model's guess of the clean sequence from x_t [B, L]: the argmax of p_θ(x_0 | x_t) at masked
        positions, the tokens of x_t elsewhere. [B, L] long."""
        log_p0 = denoising_log_probs(self.logits(x_t, self._conditioning(conditions)), options.temperature)
        return torch.where(x_t == self.mask_id, log_p0[..., : self.mask_id].argmax(-1), x_t)

    def _initial_state(self, batch: int, length: int, conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_1: every position MASK, except padding positions (conditioning["valid"] False, for batches of
        different lengths), which hold token 0 from the start, so they are never sampled and add nothing to a
        step's log-probability or KL."""
        x = torch.full((batch, length), self.mask_id, dtype=torch.long, device=self.device)
        valid = conditioning.get("valid")
        return x if valid is None else torch.where(valid.to(self.device).bool(), x, torch.zeros_like(x))

    def prepare_conditions(self, conditions: Conditions | Sequence[str]) -> Conditions:
        """Conditions with their tensors: a conditional backbone (one with `condition_tensors(texts)`, e.g. a
        protein backbone structure named by each text) turns texts into per-sample tensors; given tensors and
        unconditional backbones pass through."""
        conditions = Conditions.coerce(conditions)
        encode = getattr(self.backbone, "condition_tensors", None)
        if conditions.tensors or encode is None or not len(conditions):
            return conditions
        # The text determines the tensors, so it is the condition's key (no digest of megabytes per sample).
        return Conditions(conditions.texts, tensors=encode(conditions.texts), ids=conditions.ids or conditions.texts)

    def _conditioning(self, conditions: Conditions) -> dict[str, torch.Tensor]:
        return {name: t.to(self.device) for name, t in conditions.tensors.items()}

    def _resolve(self, conditions: Conditions | Sequence[str], options: MaskedSamplingOptions | None
                 ) -> tuple[Conditions, MaskedSamplingOptions, int]:
        conditions = self.prepare_conditions(conditions)
        if not len(conditions):
            raise ValueError("no conditions: pass one (e.g. \"\") per sample wanted")
        options = options or self.default_options()
        if options.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1; got {options.num_inference_steps}")
        length = options.length or self.config.length
        self.check_length(conditions.tensors["valid"].shape[1] if "valid" in conditions.tensors else length)
        return conditions, options, length

    def check_length(self, length: int) -> None:
        """Refuse sequences longer than the model can read: the transformer's position table holds
        `config.length` positions (the CNN and ProteinMPNN take any length)."""
        if self.config.backbone == "transformer" and length > self.config.length:
            raise ValueError(f"sequences of length {length} are longer than this model's maximum of "
                             f"{self.config.length} tokens (its position table); sample or score at most "
                             f"{self.config.length} tokens, or pre-train a model with a larger length")

    @torch.no_grad()
    def sample(
        self,
        conditions: Conditions | Sequence[str],
        options: MaskedSamplingOptions | None = None,
        *,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_trajectory: bool = True,
        progress: bool = False,
    ) -> Rollout:
        """One sequence per condition (texts ignored: the model is unconditional).

        Returns a Rollout with outputs [B, L] long ids in 0..V−1 and, if asked, a Trajectory with states
        [B, T+1, L] long (all-MASK first), log_probs [B, T] float64, trainable [T] (all but the argmax step),
        no conditioning tensors, and `options`. Per-sample `seeds` make every sample independent of
        `batch_size` chunking.
        """
        conditions, options, length = self._resolve(conditions, options)
        if "valid" in conditions.tensors:
            length = conditions.tensors["valid"].shape[1]
        generators = per_sample_generators(seeds, len(conditions))
        chunk = batch_size or len(conditions)
        parts = []
        for start in range(0, len(conditions), chunk):
            part = conditions[start : start + chunk]
            gens = None if generators is None else generators[start : start + chunk]
            parts.append(self._sample_chunk(part, options, length, gens, return_trajectory, progress))
        return Rollout.cat(parts)

    def _sample_chunk(self, conditions: Conditions, options: MaskedSamplingOptions, length: int,
                      generators: list[torch.Generator] | None, record: bool, progress: bool) -> Rollout:
        T = options.num_inference_steps
        conditioning = self._conditioning(conditions)
        x = self._initial_state(len(conditions), length, conditioning)
        states, log_probs = [x], []
        for k in tqdm(range(T), disable=not progress, desc="masked sampling", leave=False):
            x, log_prob = self._hard_step(x, k, options, generators, record, conditioning)
            if record:
                states.append(x)
                log_probs.append(log_prob)
        trajectory = None
        if record:
            trajectory = Trajectory(
                states=torch.stack(states, dim=1),
                log_probs=torch.stack(log_probs, dim=1),
                trainable=self.trainable_steps(options).to(x.device),
                conditioning=conditioning,
                options=options,
            )
        return Rollout(outputs=x, modality="sequence", conditions=conditions, trajectory=trajectory)

    def step_log_prob(self, trajectory: Trajectory, step_index: torch.Tensor | int) -> torch.Tensor:
        """[B] float64 log π_θ(states[:, k+1] | states[:, k]) under the current weights for step k = step_index
        [B] (or one int for all), in one batched backbone call; 0 on steps without a density. Differentiable."""
        B = len(trajectory)
        device = self.device
        index = torch.as_tensor(step_index, dtype=torch.long, device=device).expand(B)
        rows = torch.arange(B, device=device)
        states = trajectory.states.to(device)
        x_t, x_s = states[rows, index], states[rows, index + 1]
        conditioning = {name: t.to(device) for name, t in trajectory.conditioning.items()}
        log_q = self.transition_log_probs(x_t, index, trajectory.options, conditioning)
        log_prob = _reduce(log_q.gather(-1, x_s[..., None]).squeeze(-1), trajectory.options, conditioning)
        return torch.where(trajectory.trainable.to(device)[index], log_prob, torch.zeros_like(log_prob))

    def sample_differentiable(
        self,
        conditions: Conditions | Sequence[str],
        options: MaskedSamplingOptions | None = None,
        *,
        grad_steps: int = 1,
        seeds: Sequence[int] | None = None,
        tau: float = 1.0,
        kl_to_reference: bool = False,
    ) -> Rollout:
        """DRAKES's relaxed sampler: outputs carry gradients through the last K = `grad_steps` steps.

        The first T − K steps are sampled hard and detached (the same draws as `sample` with the same seeds). The
        last K are relaxed: the state is a soft one-hot x [B, L, V+1]; x̃ = softmax((log q + g)/τ) over the real
        tokens and MASK with Gumbel noise g (q of a masked position, p_θ from the soft state), and
        x ← c·x + (1 − c)·x̃ with c = 1 − x[MASK] (what is unmasked stays). All K steps are Gumbel-softmax draws,
        the last included (where `sample` takes the argmax); with K = 0 the result equals `sample`'s.

        Args:
            kl_to_reference: also return what DRAKES's KL term needs: extras["kl_relaxed"] [B], the exact KL
                (`step_kl`) summed over the K relaxed steps, differentiable through their soft states and the
                model; and extras["hard_states"] [B, T−K, L], the inputs of the hard steps, whose KL terms
                (`step_kl` on each) depend on the model but not on each other, so they can be evaluated and
                backpropagated in chunks without one graph over all T steps.
        Returns:
            A Rollout whose outputs are the straight-through one-hot [B, L, V] float: forward value the one-hot
            of the argmax over real tokens, gradient that of the relaxed x (sequence rewards accept this);
            no trajectory.
        """
        conditions, options, length = self._resolve(conditions, options)
        T = options.num_inference_steps
        if not 0 <= grad_steps <= T:
            raise ValueError(f"grad_steps must be in [0, num_inference_steps={T}]; got {grad_steps}")
        generators = per_sample_generators(seeds, len(conditions))
        conditioning = self._conditioning(conditions)
        if "valid" in conditioning:
            length = conditioning["valid"].shape[1]
        B, V = len(conditions), self.vocab_size
        x = self._initial_state(B, length, conditioning)
        hard_states = []
        with torch.no_grad():
            for k in range(T - grad_steps):
                hard_states.append(x)
                x, _ = self._hard_step(x, k, options, generators, False, conditioning)
        soft = F.one_hot(x, V + 1).to(self.dtype)
        kl = torch.zeros(B, dtype=torch.float64, device=self.device)
        for k in range(T - grad_steps, T):
            step = torch.full((B,), k, device=x.device)
            log_p0 = denoising_log_probs(self.logits(soft, conditioning), options.temperature)
            if kl_to_reference:
                kl = kl + self._kl_from_log_p0(log_p0, soft, step, options, conditioning)
            m_t, m_s = self._masking_levels(step, T)
            log_q = masked_transition_log_probs(log_p0, m_t, m_s)
            noise = _gumbel(_uniforms((length, V + 1), generators, B, x.device)).to(log_q.dtype)
            relaxed = torch.softmax((log_q + noise) / tau, dim=-1)
            keep = 1.0 - soft[..., self.mask_id :]
            soft = keep * soft + (1.0 - keep) * relaxed
        real = soft[..., :V]
        hard = F.one_hot(real.argmax(-1), V).to(real.dtype)
        extras = {}
        if kl_to_reference:
            extras["kl_relaxed"] = kl
            extras["hard_states"] = (torch.stack(hard_states, dim=1) if hard_states
                                     else torch.zeros(B, 0, length, dtype=torch.long, device=self.device))
        return Rollout(outputs=real + (hard - real).detach(), modality="sequence", conditions=conditions,
                       extras=extras)

    def step_kl(self, x_t: torch.Tensor, step_index: torch.Tensor, options: MaskedSamplingOptions,
                conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The exact KL between this model's reverse step and the pretrained model's (`reference()`) at x_t.

            KL_t = Σ_i w_i · (m_t − m_s)/m_t · KL(p_θ(·|x_t)_i ‖ p_pre(·|x_t)_i)

        over positions still masked at t: w_i = 1 where x_t is MASK for ids [B, L], and w_i = x_t[i, MASK] for a
        soft state [B, L, V+1] (the same, on hard one-hots). Unmasked positions are carried over by both models,
        so they contribute nothing; the MASK outcome has the same probability m_s/m_t under both.

        Returns [B] float64, differentiable with respect to this model (the reference is evaluated without
        gradients).
        """
        log_p0 = denoising_log_probs(self.logits(x_t, conditioning), options.temperature)
        return self._kl_from_log_p0(log_p0, x_t, torch.as_tensor(step_index, device=x_t.device).expand(len(x_t)),
                                    options, conditioning)

    def _kl_from_log_p0(self, log_p0: torch.Tensor, x_t: torch.Tensor, step_index: torch.Tensor,
                        options: MaskedSamplingOptions, conditioning: dict[str, torch.Tensor] | None) -> torch.Tensor:
        with torch.no_grad(), self.reference():
            log_pre = denoising_log_probs(self.logits(x_t, conditioning), options.temperature)
        real_p0, real_pre = log_p0[..., :-1].double(), log_pre[..., :-1].double()
        per_position = (real_p0.exp() * (real_p0 - real_pre)).sum(-1)  # KL(p_θ ‖ p_pre) at every position
        masked = (x_t == self.mask_id).double() if not x_t.is_floating_point() else x_t[..., self.mask_id].double()
        m_t, m_s = self._masking_levels(step_index, options.num_inference_steps)
        return ((m_t - m_s) / m_t) * (masked * per_position).sum(-1)


def _reduce(per_position: torch.Tensor, options: MaskedSamplingOptions,
            conditioning: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, L] per-position log q → [B]: their sum (the step's log-density) or mean over the (valid) positions
    (`log_prob_reduction`). Padding positions contribute 0 to the sum and are not counted in the mean."""
    if options.log_prob_reduction == "sum":
        return per_position.sum(-1)
    valid = (conditioning or {}).get("valid")
    count = per_position.shape[-1] if valid is None else valid.to(per_position.device).sum(-1).clamp(min=1)
    return per_position.sum(-1) / count


def _merged(module: nn.Module) -> nn.Module:
    """`module` itself without LoRA layers; else a copy with every LoRA layer merged into its base layer."""
    if not adapter_layers({"module": module}):
        return module
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(module)
    for name, layer in [(n, m) for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name), child, layer.get_base_layer())
    return merged
