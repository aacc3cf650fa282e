"""Short prompts of the shapes world and the prompt-expansion network (PEN) that details them (Parrot).

A *short* prompt names one shape's shape, colour and position only, in one of two phrasings
(:data:`SHORT_TEMPLATES`): "a red circle at the top left" or "red circle, top left". Its size and the
background are left unspecified, for an expansion to choose: a *detailed* prompt is a full
:func:`genalign.worlds.shapes.caption` (any of its 8 templates) of a scene with the same shape, colour and
position. The gold judge (:mod:`genalign.worlds.shapes_judge`) reads both kinds; on a short prompt it judges
only what the prompt specifies.

The PEN is a tiny GPT-2 with a byte-level BPE tokenizer trained on the world's captions and short prompts,
supervised-fine-tuned on fresh (short, detailed) pairs (:func:`train_shapes_pen`), each behind a random
subset, in random order, of the four ``"<reward k>"`` tokens, so it accepts any reward prefix before RL
teaches the tokens a meaning. The build stage ``pen`` (:mod:`genalign.worlds.build_shapes`) trains it and
commits it to ``genalign/worlds/assets/shapes/pen``.

Held out. SFT never sees the 128 (shape, colour, position) combinations of :func:`held_out_combos` (of the
360 there are), so the stage's faithful-expansion rates measure expansions of short prompts the PEN never
saw in either phrasing.

Prompt files. ``configs/prompts/shapes_short_train.txt`` (16 prompts, :func:`short_prompts` with seed 0)
and ``configs/prompts/shapes_short_eval.txt`` (32 prompts, seed 1, none sharing a shape-colour-position
combination with the train file) were written by :func:`write_short_prompt_files` (``python -c "from
genalign.worlds.shapes_expansion import write_short_prompt_files; write_short_prompt_files('configs/prompts')"``).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import shapes
from .shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapeSpec

# Fields: {colour} {shape} {position}. Written with "a" only; articles are fixed afterwards as in captions.
SHORT_TEMPLATES: tuple[str, ...] = ("a {colour} {shape} at the {position}", "{colour} {shape}, {position}")
NUM_REWARD_TOKENS = 4  # reward tokens the committed PEN's tokenizer carries
HELD_OUT_COMBOS = 128
PEN_VOCAB_SIZE = 512
PEN_CONTEXT = 128
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SHORT_TRAIN_FILE, SHORT_EVAL_FILE = "shapes_short_train.txt", "shapes_short_eval.txt"

_SHORT_PARSERS = tuple(shapes._compile(t, shapes._FIELD_PATTERNS) for t in SHORT_TEMPLATES)
Combo = tuple[str, str, str]  # (shape, colour, position)


def short_caption(spec: ShapeSpec, rng: np.random.Generator, *, template: int | None = None) -> str:
    """A short prompt naming spec's shape, colour and position (its size is ignored), in phrasing
    ``template`` (index into SHORT_TEMPLATES) or one drawn from rng."""
    index = int(rng.integers(len(SHORT_TEMPLATES))) if template is None else template
    text = SHORT_TEMPLATES[index].format(colour=spec.colour, shape=spec.shape, position=spec.position)
    return shapes._with_articles(text)


def parse_short_caption(text: str) -> Scene | None:
    """Invert :func:`short_caption` (case, extra spaces and a final period tolerated): a one-shape Scene
    whose ShapeSpec.size and background are None (unspecified); None if the text is no short prompt."""
    normal = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")
    normal = re.sub(r"\ban\b", "a", normal)
    for parser in _SHORT_PARSERS:
        match = parser.fullmatch(normal)
        if match is not None:
            spec = ShapeSpec(shape=match["shape"], colour=match["colour"], size=None, position=match["position"])
            return Scene(shapes=(spec,), background=None)
    return None


def _combo(scene: Scene) -> Combo:
    spec = scene.shapes[0]
    return spec.shape, spec.colour, spec.position


def all_combos() -> list[Combo]:
    """Every (shape, colour, position) a short prompt can name: 5 x 8 x 9 = 360."""
    return list(itertools.product(SHAPES, COLOURS, POSITIONS))


def held_out_combos(seed: int = 0, n: int = HELD_OUT_COMBOS) -> list[Combo]:
    """The n combinations the PEN's supervised fine-tuning never sees (a seeded draw from all_combos)."""
    combos = all_combos()
    order = np.random.default_rng(seed).permutation(len(combos))
    return [combos[i] for i in order[:n]]


def _detail(combo: Combo, rng: np.random.Generator) -> str:
    """A full caption of a scene with combo's shape, colour and position and a random size, background
    (never the shape's own colour, which would hide it, as sample_scenes does) and template."""
    shape, colour, position = combo
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    spec = ShapeSpec(shape=shape, colour=colour, size=SIZES[rng.integers(len(SIZES))], position=position)
    scene = Scene(shapes=(spec,), background=backgrounds[rng.integers(len(backgrounds))])
    return shapes.caption(scene, rng=rng)


def expansion_pairs(n: int, seed: int, *, combos: Sequence[Combo] | None = None) -> list[tuple[str, str]]:
    """n (short prompt, detailed prompt) pairs: a uniform combination (from ``combos``, default all 360),
    a random phrasing of it, and a full caption with a random size, background and template."""
    pool = list(combos) if combos is not None else all_combos()
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        combo = pool[rng.integers(len(pool))]
        spec = ShapeSpec(shape=combo[0], colour=combo[1], size=None, position=combo[2])
        pairs.append((short_caption(spec, rng), _detail(combo, rng)))
    return pairs


def is_faithful_expansion(short: str, detailed: str) -> bool:
    """True when ``detailed`` is a full shapes caption (:func:`~genalign.worlds.shapes.parse_caption`) of
    exactly one shape with the short prompt's shape, colour and position (size and background are free)."""
    asked = parse_short_caption(short) or shapes.parse_caption(short)
    scene = shapes.parse_caption(detailed)
    if asked is None or scene is None or len(scene.shapes) != 1 or len(asked.shapes) != 1:
        return False
    return _combo(scene) == _combo(asked)


def hides_shape(detailed: str) -> bool:
    """True when a caption puts a shape on a background of its own colour, so a render shows none of it
    (the training pairs never do; a faithful expansion still may)."""
    scene = shapes.parse_caption(detailed)
    return scene is not None and any(spec.colour == scene.background for spec in scene.shapes)


def short_prompts(n: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """n short prompts of distinct combinations, none naming a combination that a prompt of ``exclude``
    names (so a held-out set never holds another phrasing of a training prompt)."""
    rng = np.random.default_rng(seed)
    taken = {_combo(parse_short_caption(p)) for p in exclude if parse_short_caption(p) is not None}
    if n > len(all_combos()) - len(taken):
        raise ValueError(f"only {len(all_combos()) - len(taken)} combinations are left for {n} short prompts")
    prompts: list[str] = []
    while len(prompts) < n:
        spec = ShapeSpec(SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))], None,
                         POSITIONS[rng.integers(len(POSITIONS))])  # fmt: skip
        text = short_caption(spec, rng)
        combo = (spec.shape, spec.colour, spec.position)
        if combo not in taken:
            taken.add(combo)
            prompts.append(text)
    return prompts


def write_short_prompt_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write SHORT_TRAIN_FILE (16 prompts, seed 0) and SHORT_EVAL_FILE (32, seed 1, other combinations)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = short_prompts(16, seed=0)
    held_out = short_prompts(32, seed=1, exclude=train)
    (folder / SHORT_TRAIN_FILE).write_text("\n".join(train) + "\n")
    (folder / SHORT_EVAL_FILE).write_text("\n".join(held_out) + "\n")
    return folder / SHORT_TRAIN_FILE, folder / SHORT_EVAL_FILE


# --- the PEN ----------------------------------------------------------------------------------------------


def caption_corpus(seed: int) -> list[str]:
    """The texts the PEN tokenizer is trained on: every short prompt in both phrasings and 4,000 full
    captions of random one- and two-shape scenes."""
    rng = np.random.default_rng(seed)
    corpus = [
        short_caption(ShapeSpec(shape, colour, None, position), rng, template=t)
        for shape, colour, position in all_combos()
        for t in range(len(SHORT_TEMPLATES))
    ]
    corpus += [shapes.caption(scene, rng=rng) for scene in shapes.sample_scenes(4000, rng=rng, max_shapes=2)]
    return corpus


def pen_tokenizer(corpus: Sequence[str], vocab_size: int = PEN_VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``corpus`` as a transformers ``PreTrainedTokenizerFast``.

    Byte-level with no prefix space and no clean-up on decode, so decode(encode(text)) == text for any
    text. Special tokens (never split): pad, EOS, the separator and ``"<reward 1>"`` … ``"<reward 4>"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from genalign.generators.prompt_expansion import REWARD_TOKEN, SEPARATOR

    extra = [SEPARATOR] + [REWARD_TOKEN.format(k=k) for k in range(1, NUM_REWARD_TOKENS + 1)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN, *extra],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, additional_special_tokens=extra,
        clean_up_tokenization_spaces=False, model_max_length=PEN_CONTEXT,
    )


def _reward_subset(rng: np.random.Generator) -> tuple[int, ...]:
    """A random subset of 1..NUM_REWARD_TOKENS in random order; its size is uniform over 0..4, so the empty
    prefix and all four tokens are as common as any other size."""
    size = int(rng.integers(NUM_REWARD_TOKENS + 1))
    return tuple(int(k) + 1 for k in rng.permutation(NUM_REWARD_TOKENS)[:size])


def train_shapes_pen(
    *,
    steps: int,
    batch_size: int = 64,
    width: int = 64,
    layers: int = 2,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
):
    """Build the PEN (tokenizer + tiny GPT-2) and supervised-fine-tune it on fresh expansion pairs.

    Every step draws ``batch_size`` new pairs from the combinations outside :func:`held_out_combos`, each
    behind a random reward-token subset; AdamW with warm-up + cosine decay, gradients clipped at 1.
    Seeded (same arguments, same weights); torch's global RNG is left untouched. Returns the
    :class:`~genalign.generators.prompt_expansion.PromptExpansionNetwork` (CPU, eval mode) and metrics
    (``final_loss``, ``parameters``, ``vocab_size``, ``train_seconds``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from genalign.generators.prompt_expansion import PromptExpansionNetwork
    from genalign.worlds.schedules import warmup_cosine

    corpus = caption_corpus(seed)
    tokenizer = pen_tokenizer(corpus)
    broken = [t for t in corpus if tokenizer.decode(tokenizer.encode(t)) != t]
    if broken:
        raise RuntimeError(f"the PEN tokenizer does not round-trip {broken[0]!r}")
    longest = max(len(tokenizer.encode(t)) for t in corpus[len(all_combos()) * len(SHORT_TEMPLATES) :])
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=PEN_CONTEXT, n_embd=width, n_layer=layers, n_head=4,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    held_out = set(held_out_combos(seed))
    combos = [c for c in all_combos() if c not in held_out]
    rng = np.random.default_rng(seed + 1)
    start = time.perf_counter()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
        # max_new_tokens: the longest single-shape caption seen in the corpus, plus EOS and some slack.
        pen = PromptExpansionNetwork(model, tokenizer, max_new_tokens=longest + 8, temperature=1.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
        for step in range(steps):
            pairs = expansion_pairs(batch_size, int(rng.integers(2**62)), combos=combos)
            rewards = [_reward_subset(rng) for _ in pairs]
            loss = pen.supervised_loss([s for s, _ in pairs], [d for _, d in pairs], rewards)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if progress is not None:
                progress(step, losses[-1])
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    return pen, {
        "final_loss": float(np.mean(tail)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "max_new_tokens": pen.max_new_tokens,
        "train_seconds": time.perf_counter() - start,
    }


def held_out_short_prompts(seed: int = 0) -> list[str]:
    """Both phrasings of every held-out combination (256 short prompts the PEN never saw)."""
    return [
        short_caption(ShapeSpec(shape, colour, None, position), np.random.default_rng(0), template=t)
        for shape, colour, position in held_out_combos(seed)
        for t in range(len(SHORT_TEMPLATES))
    ]


@torch.no_grad()
def evaluate_pen(pen, prompts: Sequence[str], *, seed: int, samples: int = 8) -> dict[str, float]:
    """Faithful-expansion rates of ``pen`` on short ``prompts``: greedy and sampled (at pen.temperature),
    each with no reward tokens (``*_plain``) and with all of them (``*_all``); for the sampled ones with all
    reward tokens also the fraction that hide the shape (:func:`hides_shape`) and the mean expansion length
    in tokens; the mean number of distinct expansions among ``samples`` samples per prompt (all tokens)."""
    prompts = list(prompts)
    everything = tuple(range(1, pen.num_reward_tokens + 1))
    metrics: dict[str, float] = {"held_out_prompts": len(prompts)}
    for name, rewards in (("plain", ()), ("all", everything)):
        for mode, greedy in (("greedy", True), ("sampled", False)):
            seeds = [seed + i for i in range(len(prompts))]
            result = pen.expand(prompts, [rewards] * len(prompts), seeds=seeds, greedy=greedy, batch_size=256)
            faithful = [is_faithful_expansion(p, t) for p, t in zip(prompts, result.texts)]
            metrics[f"faithful_{mode}_{name}"] = float(np.mean(faithful))
            if mode == "sampled" and name == "all":
                metrics["hidden_shape_sampled_all"] = float(np.mean([hides_shape(t) for t in result.texts]))
                metrics["expansion_tokens"] = float(result.mask.sum(dim=1).float().mean())
    repeated = [p for p in prompts for _ in range(samples)]
    seeds = [seed + 100_000 + i for i in range(len(repeated))]
    result = pen.expand(repeated, [everything] * len(repeated), seeds=seeds, batch_size=512)
    distinct = [len(set(result.texts[i : i + samples])) for i in range(0, len(repeated), samples)]
    metrics[f"distinct_of_{samples}"] = float(np.mean(distinct))
    return metrics
