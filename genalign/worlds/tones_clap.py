"""A tiny CLAP for the tones world, trained contrastively on synthesised (clip, caption) pairs.

The model is a plain transformers ``ClapModel`` (HTSAT audio tower, RoBERTa text tower) with a
``ClapProcessor``, so it saves and loads like a public CLAP checkpoint: ``rewards.audio.ClapScore(model=folder,
sampling_rate=16000)`` reads it as the tones world's CLAP-score reward, and :func:`text_encoder_from_clap`
makes the ``ClapTextModelWithProjection`` that AudioLDM-style text-to-audio models condition on.

Tokenizer. A byte-level BPE trained with ``tokenizers`` on every caption the world can produce
(:func:`genalign.worlds.tones.all_captions`), loaded as ``RobertaTokenizerFast`` with RoBERTa's special
tokens (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2): 384 tokens, every caption word a single token. The longest caption
is 18 tokens with ``<s>`` and ``</s>``; ``model_max_length`` is 32. RoBERTa positions start after the padding index,
so the text tower has ``model_max_length + 2`` position embeddings (AudioLDM pads to ``model_max_length``).

Features. ``ClapFeatureExtractor(feature_size=64, sampling_rate=16000, hop_length=160, fft_window_size=1024,
max_length_s=2, frequency_min=0, frequency_max=8000, truncation="rand_trunc", padding="repeatpad")``: one
channel of [201 frames, 64 Slaney mel bins] in dB per 2 s clip (the default truncation="fusion" makes
4-channel input that a non-fusion model rejects). Training computes the same features in batches with
``rewards.audio.ClapLogMel``, the torch copy of that extractor, once for a fixed pool of clips.

Audio tower. HTSAT needs ``spec_size = num_mel_bins * freq_ratio`` with ``spec_size * freq_ratio >= 201``
frames, so spec_size is 128 (freq_ratio 2): the 201 frames are stretched to 256 and folded into a 128x128
"image", cut into 8x8 patches (16x16 tokens, then 8x8 after the one patch merge). ``hidden_size`` must equal
``patch_embeds_hidden_size * 2 ** (len(depths) - 1)``.

Loss. Symmetric InfoNCE with soft multi-positive targets: with 144 attribute combinations, a batch of 64
often holds several clips of the same combination, and plain InfoNCE would push those true matches apart.
Each row's target spreads its mass uniformly over every column of the same combination. Linear attribute
heads on the audio embedding add a cross-entropy during training only (see :func:`train_tones_clap`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapProcessor,
    ClapTextModelWithProjection,
    RobertaTokenizerFast,
)

from genalign.worlds.schedules import warmup_cosine
from genalign.worlds.tones import (
    ALL_TONES,
    ATTRIBUTES,
    CLIP_SECONDS,
    NUM_TEMPLATES,
    SAMPLE_RATE,
    SEED_BLOCKS,
    VOCABULARIES,
    Tone,
    all_captions,
    caption,
    clip_seeds,
    degrade,
    sample_tones,
    synthesize_batch,
)

DEFAULT_MAX_LENGTH = 32
# Zero-shot attribute probes use one fixed wording, so only the attribute varies between candidates.
PROBE_TEMPLATE = 0
EVAL_CLIPS = 512
_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_FEATURE_BATCH = 128  # clips per ClapLogMel call when building the pool

# Sizes of the build (``full``) and of the tests (``tiny``); pass with the recipe's seed to train_tones_clap.
# The world build's measurements (time, retrieval, zero-shot probes) are in docs/worlds.md (tones).
CLAP_SIZES: dict[str, dict[str, int]] = {
    "full": {"clips": 4000, "steps": 800, "batch_size": 64},
    "tiny": {"clips": 32, "steps": 3, "batch_size": 8, "eval_clips": 32},
}


def tones_clap_tokenizer(model_max_length: int = DEFAULT_MAX_LENGTH) -> RobertaTokenizerFast:
    """A byte-level BPE trained on every tones caption (384 tokens: the merges run out below the 400 asked
    for), as a ``RobertaTokenizerFast``.

    Deterministic: the captions come in a fixed order and BPE training has no randomness.
    """
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(all_captions(), vocab_size=400, min_frequency=1, special_tokens=_SPECIAL_TOKENS,
                            show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        return RobertaTokenizerFast.from_pretrained(tmp, model_max_length=model_max_length)


def tones_feature_extractor() -> ClapFeatureExtractor:
    """The ClapFeatureExtractor of the tones CLAP (see the module docstring for why these settings)."""
    return ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=SAMPLE_RATE,
        hop_length=160,
        fft_window_size=1024,
        max_length_s=int(CLIP_SECONDS),  # an int: nb_max_samples = max_length_s * sampling_rate is a length
        frequency_min=0,
        frequency_max=SAMPLE_RATE // 2,
        truncation="rand_trunc",
        padding="repeatpad",
    )


def tiny_clap_config(
    tokenizer: RobertaTokenizerFast, *, text_hidden: int = 64, audio_hidden: int = 32, projection: int = 32
) -> ClapConfig:
    """A small ``ClapConfig``: a 2-layer RoBERTa text tower ``text_hidden`` wide and a two-stage HTSAT audio
    tower (``audio_hidden`` then ``2 * audio_hidden`` wide), both projected to ``projection`` dimensions."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * text_hidden,
        max_position_embeddings=tokenizer.model_max_length + 2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    audio = dict(
        spec_size=128,
        num_mel_bins=64,
        patch_size=8,
        patch_stride=(8, 8),
        window_size=8,
        depths=[1, 1],
        num_attention_heads=[2, 4],
        patch_embeds_hidden_size=audio_hidden,
        hidden_size=audio_hidden * 2,  # patch_embeds_hidden_size * 2 ** (len(depths) - 1)
        enable_fusion=False,
    )
    return ClapConfig(text_config=text, audio_config=audio, projection_dim=projection)


def _pooled(output: object) -> Tensor:
    """``get_*_features`` output -> projected embeddings: a tensor in transformers 4, pooler_output in 5."""
    return output if isinstance(output, Tensor) else output.pooler_output


def audio_embeddings(model: ClapModel, input_features: Tensor) -> Tensor:
    """CLAP audio features [B, 1, 201, 64] (the extractor's ``input_features``) -> [B, projection] unit norm."""
    return F.normalize(_pooled(model.get_audio_features(input_features=input_features)), dim=-1)


def text_embeddings(model: ClapModel, tokenizer: RobertaTokenizerFast, texts: Sequence[str]) -> Tensor:
    """B captions -> [B, projection] unit-norm text embeddings."""
    tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    output = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return F.normalize(_pooled(output), dim=-1)


def same_tone(tones: Sequence[Tone]) -> Tensor:
    """B tones -> bool [B, B], True where two clips have the same attribute combination (diagonal included)."""
    ids = {tone: i for i, tone in enumerate(dict.fromkeys(tones))}
    index = torch.tensor([ids[t] for t in tones])
    return index[:, None] == index[None, :]


def soft_clap_loss(audio_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, positives: Tensor) -> Tensor:
    """Symmetric InfoNCE with multi-positive targets.

    Args:
        audio_emb, text_emb: [B, D] unit-norm embeddings of matching pairs (row i with row i).
        logit_scale: scalar log temperature (the logits are ``exp(logit_scale) * cosine``, at most 100).
        positives: bool [B, B]; True where clip i and caption j have the same attribute combination.

    Returns:
        Scalar: mean of the audio->text and text->audio cross-entropies against targets that share each
        row's mass equally among its positives.
    """
    logits = logit_scale.exp().clamp(max=100.0) * audio_emb @ text_emb.T
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    # positives is symmetric, so the same targets serve the transposed (text->audio) logits.
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def clap_features(extractor: ClapFeatureExtractor, waveforms: Tensor) -> Tensor:
    """[B, T] clips at 16 kHz -> CLAP ``input_features`` [B, 1, 201, 64], computed in batches by
    ``rewards.audio.ClapLogMel`` (the torch copy of the extractor; equal to its output for 2 s clips)."""
    from rewards.audio import ClapLogMel

    front = ClapLogMel(extractor, fusion=False)
    with torch.no_grad():
        return torch.cat([front(chunk)[0] for chunk in waveforms.split(_FEATURE_BATCH)])


def _clips(n: int, *, seed: int, held_out: bool) -> tuple[Tensor, list[Tone]]:
    tones = sample_tones(n, np.random.default_rng([SEED_BLOCKS["clap"], seed, int(held_out)]))
    return synthesize_batch(tones, clip_seeds("clap", n, seed=seed, held_out=held_out)), tones


@torch.no_grad()
def evaluate_tones_clap(
    model: ClapModel, processor: ClapProcessor, *, seed: int, n: int = EVAL_CLIPS, group: int = 64
) -> dict[str, float]:
    """Retrieval and zero-shot attribute accuracy on ``n`` held-out clips of the ``clap`` seed block.

    Retrieval: for each clip's caption (a random template), the top-1 clip within its group of ``group``
    clips; a pick is right when its attribute combination equals the caption's. ``retrieval_chance`` is
    what picking uniformly at random would score on the same groups. Probes: for each clip and attribute,
    PROBE_TEMPLATE captions of the clip's tone with that attribute set to each possible value; right when
    the clip's own value scores highest (chance 1 / number of values).

    Returns:
        ``text_to_audio_top1``, ``retrieval_chance``, ``probe_<attribute>`` per attribute and ``probe_mean``.
    """
    was_training = model.training
    model.eval()
    waveforms, tones = _clips(n, seed=seed, held_out=True)
    audio = audio_embeddings(model, clap_features(processor.feature_extractor, waveforms))
    rng = np.random.default_rng([SEED_BLOCKS["clap"], seed, 2])
    captions = [caption(tone, int(t)) for tone, t in zip(tones, rng.integers(NUM_TEMPLATES, size=n))]
    text = text_embeddings(model, processor.tokenizer, captions)
    hits, chance = 0.0, 0.0
    for start in range(0, n, group):
        same = same_tone(tones[start : start + group])
        picks = (text[start : start + group] @ audio[start : start + group].T).argmax(dim=1)
        hits += same[torch.arange(len(picks)), picks].float().sum().item()
        chance += (same.float().sum(dim=1) / len(picks)).sum().item()
    metrics = {"text_to_audio_top1": hits / n, "retrieval_chance": chance / n}
    for name in ATTRIBUTES:
        values = VOCABULARIES[name]
        prompts = [caption(replace(tone, **{name: value}), PROBE_TEMPLATE) for tone in tones for value in values]
        candidates = text_embeddings(model, processor.tokenizer, prompts).view(n, len(values), -1)
        scores = (candidates * audio[:, None]).sum(dim=-1)  # [n, values]
        truth = torch.tensor([values.index(getattr(tone, name)) for tone in tones])
        metrics[f"probe_{name}"] = (scores.argmax(dim=1) == truth).float().mean().item()
    metrics["probe_mean"] = float(np.mean([metrics[f"probe_{name}"] for name in ATTRIBUTES]))
    model.train(was_training)
    return metrics


def tones_clap_processor(tokenizer: RobertaTokenizerFast | None = None) -> ClapProcessor:
    """The tones CLAP's processor: :func:`tones_feature_extractor` + :func:`tones_clap_tokenizer`."""
    return ClapProcessor(feature_extractor=tones_feature_extractor(), tokenizer=tokenizer or tones_clap_tokenizer())


def train_tones_clap(
    *,
    clips: int,
    steps: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
    lr: float = 2e-3,
    eval_clips: int = EVAL_CLIPS,
    attribute_weight: float = 1.0,
    degraded_fraction: float = 0.25,
) -> tuple[ClapModel, ClapProcessor, dict[str, float]]:
    """Train a tiny CLAP from scratch on a fixed pool of ``clips`` synthesised clips (seed block ``clap``).

    A random ``degraded_fraction`` of the pool goes through :func:`genalign.worlds.tones.degrade` (what a
    mel-VAE + Griffin-Lim vocoder does), so that the reward also reads generated audio; the pool's CLAP
    features are then computed once. Every step draws ``batch_size`` pool clips, gives each a
    caption in a random template (so the text tower learns every wording) and takes one AdamW step on
    :func:`soft_clap_loss` (the model's learnable ``logit_scale_a``) plus ``attribute_weight`` times the
    cross-entropies of linear attribute heads on the audio embedding, under a linear warm-up then cosine
    decay. The heads are discarded afterwards; they break a symmetric stall of contrastive training from
    scratch: while the audio tower cannot hear an attribute, the text tower learns to ignore its words, and
    then neither tower gets a gradient for it (contour stayed at chance after 800 steps without them).
    Seeded: the same arguments give the same weights, and the caller's global torch RNG is left untouched.

    Returns:
        ``(model in eval mode, processor, report)``: :func:`evaluate_tones_clap` on ``eval_clips`` held-out
        clips (groups of ``batch_size``), plus ``final_loss`` and ``final_attribute_loss`` (means over the
        last 10% of steps of the contrastive loss and of the heads' summed cross-entropy), ``data_seconds``
        (synthesis and features of the pool) and ``train_seconds``.
    """
    start = time.perf_counter()
    processor = tones_clap_processor()
    tokenizer = processor.tokenizer
    waveforms, tones = _clips(clips, seed=seed, held_out=False)
    generator = torch.Generator().manual_seed(seed)
    smear = (torch.rand(clips, generator=generator) < degraded_fraction).nonzero()[:, 0]
    for part in smear.split(_FEATURE_BATCH):
        waveforms[part] = degrade(waveforms[part], generator)
    pool = clap_features(processor.feature_extractor, waveforms)  # [clips, 1, 201, 64]
    del waveforms
    # Every caption tokenised once; all_captions() is tone-major: row = ALL_TONES index * NUM_TEMPLATES + template.
    table = tokenizer(all_captions(), padding=True, return_tensors="pt")
    pool_tones = torch.tensor([ALL_TONES.index(t) for t in tones])
    pool_targets = {
        name: torch.tensor([VOCABULARIES[name].index(getattr(t, name)) for t in tones]) for name in ATTRIBUTES
    }
    data_seconds = time.perf_counter() - start

    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="tones clap", mininterval=1.0)
    losses, attribute_losses = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClapModel(tiny_clap_config(tokenizer))
        model.train()
        heads = torch.nn.ModuleDict(
            {name: torch.nn.Linear(model.config.projection_dim, len(values)) for name, values in VOCABULARIES.items()}
        )
        optimiser = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps))
        for _ in iterator:
            rows = torch.randint(clips, (batch_size,), generator=generator)
            combos = pool_tones[rows]
            captions = combos * NUM_TEMPLATES + torch.randint(NUM_TEMPLATES, (batch_size,), generator=generator)
            ids, mask = table["input_ids"][captions], table["attention_mask"][captions]
            width = int(mask.sum(dim=1).max())  # drop columns that are padding in every row
            text = model.get_text_features(input_ids=ids[:, :width], attention_mask=mask[:, :width])
            audio = audio_embeddings(model, pool[rows])
            contrastive = soft_clap_loss(
                audio, F.normalize(_pooled(text), dim=-1), model.logit_scale_a, combos[:, None] == combos[None, :]
            )
            attribute = sum(F.cross_entropy(heads[name](audio), pool_targets[name][rows]) for name in ATTRIBUTES)
            loss = contrastive + attribute_weight * attribute
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(contrastive.item())
            attribute_losses.append(attribute.item())
            if progress:
                iterator.set_postfix(loss=f"{contrastive.item():.3f}", refresh=False)
    train_seconds = time.perf_counter() - start - data_seconds
    model.eval()
    report = evaluate_tones_clap(model, processor, seed=seed, n=eval_clips, group=batch_size)
    tail = max(1, steps // 10)
    report["final_loss"] = float(np.mean(losses[-tail:])) if losses else math.nan
    report["final_attribute_loss"] = float(np.mean(attribute_losses[-tail:])) if losses else math.nan
    report["data_seconds"] = data_seconds
    report["train_seconds"] = train_seconds
    return model, processor, report


def save_tones_clap(model: ClapModel, processor: ClapProcessor, folder: str | os.PathLike) -> None:
    """Write ``folder`` in the Hugging Face CLAP layout (config.json, model.safetensors,
    preprocessor_config.json, tokenizer files), loadable by ``ClapModel.from_pretrained``,
    ``ClapProcessor.from_pretrained`` and ``rewards.audio.ClapScore(model=folder, sampling_rate=16000)``."""
    folder = os.fspath(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def text_encoder_from_clap(clap: ClapModel) -> ClapTextModelWithProjection:
    """The CLAP's text tower as a standalone ``ClapTextModelWithProjection`` (AudioLDM's text encoder), in
    eval mode, with the same weights: ``F.normalize(encoder(ids, attention_mask).text_embeds)`` equals
    ``F.normalize(clap.get_text_features(ids, attention_mask))``."""
    encoder = ClapTextModelWithProjection(clap.config.text_config)
    encoder.text_model.load_state_dict(clap.text_model.state_dict())
    encoder.text_projection.load_state_dict(clap.text_projection.state_dict())
    return encoder.to(clap.device, clap.dtype).eval()
