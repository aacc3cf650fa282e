"""Build the tones world (audio) from its seeded recipe: CLAP, aesthetic head, gold judge, exemplars, mel VAE,
text-to-audio.

    python scripts/build_worlds.py tones                    # the full world -> runs/worlds/tones (~45 min)
    python scripts/build_worlds.py tones --recipe tiny --out /tmp/tones-tiny   # the same recipe in seconds

Stages (each resumable; a finished stage is skipped when the build runs again):
- clap: a tiny transformers ClapModel trained contrastively on synthesised clips and their captions (the
  CLAP-score reward, and the text tower of the text-to-audio model);
- aesthetic: an aesthetic-style MLP head on the CLAP's audio embeddings fitted to a fixed pleasantness rule
  (`genalign.worlds.tones_aesthetic`; the `clap_aesthetic` reward);
- gold: a separately trained classifier of the synthesiser's parameters (the gold judge, never a reward);
- exemplars: clips of one attribute combination ("bright, fast plucked melodies"), reward and eval halves;
- vae: an AutoencoderKL on the vocoder's log-mels;
- t2a: the UNet on VAE latents conditioned on the CLAP text embedding, saved with the VAE, CLAP text encoder,
  tokenizer, scheduler and Griffin-Lim vocoder as an AudioLDMPipeline folder;
- report: the base model's per-attribute gold accuracy and CLAP score on held-out captions, next to the
  accuracy of real clips passed through the VAE and vocoder (the ceiling the VAE allows).

Seeds: every stage draws its clips from its own block of `genalign.worlds.tones.clip_seeds` ("data" for the
T2A model, "clap", "aesthetic", "gold", "exemplar"), so no clip is shared between training sets, reports and exemplars.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from genalign.worlds import read_partial_world, write_world_file

STAGES: tuple[str, ...] = ("clap", "aesthetic", "gold", "exemplars", "vae", "t2a", "report")


@dataclass(frozen=True)
class TonesRecipe:
    """Every number the build depends on. ``full`` is the committed world; ``tiny`` is the test-sized one."""

    seed: int = 0
    clap_clips: int = 4000
    clap_steps: int = 800
    clap_batch: int = 64
    # The aesthetic head: clips synthesised and embedded once, then Adam steps of 256 of them.
    aesthetic_clips: int = 3000
    aesthetic_steps: int = 400
    gold_clips: int = 3000
    gold_steps: int = 600
    gold_batch: int = 64
    # Held-out clips for the CLAP's retrieval and the gold judge's accuracy.
    eval_clips: int = 1000
    exemplars_per_half: int = 32
    # The vocoder's mel front end: 2 s at 16 kHz with hop 250 is exactly 128 frames (latents 32 × 16).
    hop_length: int = 250
    n_fft: int = 1024
    mel_bins: int = 64
    griffin_lim_iterations: int = 32
    t2a_clips: int = 4000
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_widths: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_lr: float = 2e-3
    unet_widths: tuple[int, ...] = (32, 64, 64)
    report_prompts: int = 64
    report_samples_per_prompt: int = 2
    report_steps: int = 20
    report_guidance: float = 3.0


RECIPES: dict[str, TonesRecipe] = {
    "full": TonesRecipe(),
    "tiny": TonesRecipe(
        clap_clips=64, clap_steps=3, clap_batch=16, aesthetic_clips=32, aesthetic_steps=3,
        gold_clips=64, gold_steps=3, gold_batch=16,
        eval_clips=16, exemplars_per_half=4, griffin_lim_iterations=4, t2a_clips=32, vae_steps=3, vae_batch=4,
        vae_widths=(8, 8, 8), unet_steps=3, unet_batch=4, unet_widths=(8, 16, 16),
        report_prompts=2, report_samples_per_prompt=1, report_steps=2,
    ),  # fmt: skip
}


class _Bar:
    """One tqdm bar per stage, fed by the trainers' ``progress(step, loss)`` callbacks."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, mininterval=1.0)

    def __call__(self, step: int, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def tones_vocoder(recipe: TonesRecipe):
    from genalign.generators.griffin_lim import GriffinLimVocoder
    from genalign.worlds.tones import SAMPLE_RATE

    return GriffinLimVocoder(sampling_rate=SAMPLE_RATE, model_in_dim=recipe.mel_bins, n_fft=recipe.n_fft,
                             hop_length=recipe.hop_length, f_max=SAMPLE_RATE / 2,
                             n_iter=recipe.griffin_lim_iterations)


def training_clips(recipe: TonesRecipe) -> tuple[torch.Tensor, list[str]]:
    """The T2A training set: waveforms [N, samples] and one caption each (templates drawn per clip)."""
    from genalign.worlds.tones import make_dataset

    waveforms, captions, _ = make_dataset(recipe.t2a_clips, purpose="data", seed=recipe.seed)
    return waveforms, captions


def _log_mels(recipe: TonesRecipe, waveforms: torch.Tensor) -> torch.Tensor:
    vocoder = tones_vocoder(recipe)
    return torch.cat([vocoder.log_mel(waveforms[i : i + 256]) for i in range(0, len(waveforms), 256)])


def _stage_clap(recipe: TonesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from genalign.worlds.tones_clap import save_tones_clap, train_tones_clap

    model, processor, report = train_tones_clap(clips=recipe.clap_clips, steps=recipe.clap_steps,
                                                batch_size=recipe.clap_batch, seed=recipe.seed, progress=progress,
                                                eval_clips=recipe.eval_clips)
    save_tones_clap(model, processor, out)
    return report


def _stage_aesthetic(recipe: TonesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from genalign.worlds.tones_aesthetic import save_aesthetic_head, train_aesthetic_head

    bar = _Bar("aesthetic", recipe.aesthetic_steps, progress)
    head, metrics = train_aesthetic_head(world / "clap", n_clips=recipe.aesthetic_clips, steps=recipe.aesthetic_steps,
                                         seed=recipe.seed, held_out=recipe.eval_clips, progress=bar)
    bar.close()
    save_aesthetic_head(head, out)
    return metrics


def _stage_gold(recipe: TonesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from genalign.worlds.tones_gold import save_tones_gold, train_tones_gold

    model, report = train_tones_gold(clips=recipe.gold_clips, steps=recipe.gold_steps, batch_size=recipe.gold_batch,
                                     seed=recipe.seed, progress=progress, held_out=recipe.eval_clips,
                                     degraded_held_out=recipe.eval_clips // 2)
    save_tones_gold(model, out)
    return report


def _stage_exemplars(recipe: TonesRecipe, out: Path, world: Path, progress: bool) -> dict:
    """WAV folders reward/ and eval/ (disjoint clips of EXEMPLAR_DEFINITION) and exemplars.json with each
    clip's attributes."""
    from genalign.audio_io import write_wav
    from genalign.worlds.tones import EXEMPLAR_DEFINITION, EXEMPLAR_DESCRIPTION, SAMPLE_RATE, exemplar_halves

    listing = {"description": EXEMPLAR_DESCRIPTION, "definition": EXEMPLAR_DEFINITION, "sample_rate": SAMPLE_RATE}
    for half, (waveforms, tones) in exemplar_halves(recipe.exemplars_per_half, seed=recipe.seed).items():
        (out / half).mkdir(parents=True, exist_ok=True)
        listing[half] = []
        for i, (waveform, tone) in enumerate(zip(waveforms, tones)):
            name = f"{half}/{i:03d}.wav"
            write_wav(out / name, waveform, SAMPLE_RATE)
            listing[half].append({"file": name, **asdict(tone)})
    (out / "exemplars.json").write_text(json.dumps(listing, indent=2) + "\n")
    return {"clips_per_half": recipe.exemplars_per_half, "description": EXEMPLAR_DESCRIPTION}


def _stage_vae(recipe: TonesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from genalign.worlds.tones_t2a import train_mel_vae

    start = time.perf_counter()
    waveforms, _ = training_clips(recipe)
    mels = _log_mels(recipe, waveforms)
    data_s = time.perf_counter() - start
    bar = _Bar("vae", recipe.vae_steps, progress)
    vae, report = train_mel_vae(mels, steps=recipe.vae_steps, batch_size=recipe.vae_batch,
                                widths=recipe.vae_widths, latent_channels=recipe.latent_channels, seed=recipe.seed,
                                progress=bar)
    bar.close()
    vae.save_pretrained(out)
    return {**report, "data_s": data_s}


def _stage_t2a(recipe: TonesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from diffusers import AutoencoderKL
    from transformers import ClapModel, ClapProcessor

    from genalign.generators.audio import AudioDiffusionGenerator, clap_text_embeddings
    from genalign.worlds.tones_clap import text_encoder_from_clap
    from genalign.worlds.tones_t2a import assemble_tones_pipeline, encode_mels, train_tones_unet

    vae = AutoencoderKL.from_pretrained(world / "vae").eval()
    clap = ClapModel.from_pretrained(world / "clap").eval()
    tokenizer = ClapProcessor.from_pretrained(world / "clap").tokenizer
    text_encoder = text_encoder_from_clap(clap).eval()
    waveforms, captions = training_clips(recipe)
    latents = encode_mels(vae, _log_mels(recipe, waveforms))
    # Embed captions exactly as the sampler will.
    unique = sorted(set(captions))
    table = torch.cat([clap_text_embeddings(text_encoder, tokenizer, unique[i : i + 256])
                       for i in range(0, len(unique), 256)])
    index = {text: i for i, text in enumerate(unique)}
    text_embeds = table[torch.tensor([index[c] for c in captions])]
    empty = clap_text_embeddings(text_encoder, tokenizer, [""])[0]
    bar = _Bar("unet", recipe.unet_steps, progress)
    unet, report = train_tones_unet(latents, text_embeds, empty, steps=recipe.unet_steps,
                                    batch_size=recipe.unet_batch, widths=recipe.unet_widths, lr=recipe.unet_lr,
                                    seed=recipe.seed,
                                    progress=bar)
    bar.close()
    pipe = assemble_tones_pipeline(vae, unet, text_encoder, tokenizer, tones_vocoder(recipe))
    AudioDiffusionGenerator.from_pipeline(pipe).save_pretrained(out)
    return report


def _stage_report(recipe: TonesRecipe, out: Path, world: Path, progress: bool) -> dict:
    from genalign.generators.audio import AudioDiffusionGenerator, AudioSamplingOptions
    from genalign.worlds.tones import CLIP_SECONDS, tones_prompts
    from genalign.worlds.tones_gold import TonesGold
    from rewards.audio import ClapScore

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    generator = AudioDiffusionGenerator.from_pretrained(world / "t2a")
    gold = TonesGold(world / "gold")
    clap = ClapScore(model=world / "clap", sampling_rate=generator.sample_rate)
    prompts = tones_prompts(recipe.report_prompts, seed=recipe.seed + 900)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    repeated = [p for p in prompts for _ in range(recipe.report_samples_per_prompt)]
    options = AudioSamplingOptions(num_inference_steps=recipe.report_steps, guidance_scale=recipe.report_guidance,
                                   eta=1.0, audio_length_in_s=CLIP_SECONDS)
    audio = generator.sample(repeated, options, seeds=list(range(len(repeated))), batch_size=32,
                             return_trajectory=False, progress=progress).outputs
    with torch.no_grad():
        verdicts = gold(audio, repeated)
        clap_scores = torch.cat([clap(audio[i : i + 32], repeated[i : i + 32]).rewards for i in range(0, len(audio), 32)])
    report = {f"base_gold_{k}": float(v.float().mean()) for k, v in verdicts.items()}
    report["base_clap_score"] = float(clap_scores.mean())
    # The ceiling: real clips of the same captions through the VAE and vocoder (what the model could reach).
    waveforms, captions = _real_clips_for(prompts, recipe)
    with torch.no_grad():
        latents = generator.vae.encode(generator.vocoder.log_mel(waveforms).unsqueeze(1)).latent_dist.mean
        rebuilt = generator.decode(latents * generator.vae.config.scaling_factor, waveforms.shape[-1])
        report.update({f"vae_ceiling_gold_{k}": float(v.float().mean()) for k, v in gold(rebuilt, captions).items()})
        report.update({f"real_gold_{k}": float(v.float().mean()) for k, v in gold(waveforms, captions).items()})
        report["real_clap_score"] = float(clap(waveforms, captions).rewards.mean())
    report["wall_s"] = time.perf_counter() - start
    return report


def _real_clips_for(prompts: Sequence[str], recipe: TonesRecipe) -> tuple[torch.Tensor, list[str]]:
    """One synthesised clip per prompt, with the attributes the prompt asks for (held-out data seeds)."""
    from genalign.worlds.tones import clip_seeds, parse_caption, synthesize_batch

    tones = [parse_caption(p) for p in prompts]
    return synthesize_batch(tones, clip_seeds("data", len(tones), seed=recipe.seed, held_out=True)), list(prompts)


_STAGE_FUNCTIONS = {
    "clap": _stage_clap,
    "aesthetic": _stage_aesthetic,
    "gold": _stage_gold,
    "exemplars": _stage_exemplars,
    "vae": _stage_vae,
    "t2a": _stage_t2a,
    "report": _stage_report,
}


def build_tones_world(
    folder: str | os.PathLike,
    recipe: TonesRecipe = RECIPES["full"],
    *,
    stages: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build (or finish building) the tones world in ``folder``; returns the contents of world.json.

    Args:
        stages: run only these (default: all, in order); a stage whose inputs are missing raises.
        force: rebuild the requested stages even if done, and accept a folder built with another recipe.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = read_partial_world(folder)
    if world and world.get("recipe") != _jsonable(asdict(recipe)) and not force:
        raise ValueError(f"{folder} holds a tones world built with another recipe; pass force=True (--force) to "
                         "rebuild it with this one, or choose another folder")
    if force or "recipe" not in world:
        world["recipe"] = _jsonable(asdict(recipe))
    world.setdefault("world", "tones")
    world.setdefault("stages", {})
    unknown = [s for s in stages or () if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the tones world's stages are {list(STAGES)}")
    for name in [s for s in STAGES if stages is None or s in stages]:
        out = folder / name
        done = name in world["stages"] and (out.exists() or name == "vae" and (folder / "t2a").exists())
        if done and not force:
            continue
        tmp = folder / f".tmp_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        metrics = _STAGE_FUNCTIONS[name](recipe, tmp, folder, progress)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        world["stages"][name] = metrics
        # Listed in STAGES order, also when a stage added later is built into an existing world.
        world["stages"] = {stage: world["stages"][stage] for stage in STAGES if stage in world["stages"]}
        write_world_file(folder, world)
        if progress:
            print(f"[tones] {name}: " + json.dumps({k: _round(v) for k, v in metrics.items()}), flush=True)
    # The T2A folder carries its own copy of the VAE; the stage folder was only its input.
    if "t2a" in world["stages"] and (folder / "t2a").exists():
        shutil.rmtree(folder / "vae", ignore_errors=True)
    return world


def _jsonable(value):
    return json.loads(json.dumps(value))


def _round(value):
    return round(value, 4) if isinstance(value, float) else value
