"""The prompt-expansion network (Parrot's PEN) on a tiny random GPT-2, the committed shapes PEN, and the shapes
world's short-prompt grammar."""

from pathlib import Path

import numpy as np
import pytest
import torch

from genalign.generators.base import ModelLoadError
from genalign.generators.prompt_expansion import REWARD_TOKEN, SEPARATOR, Expansion, PromptExpansionNetwork
from genalign.worlds import shapes
from genalign.worlds.shapes import Scene, ShapeSpec
from genalign.worlds.shapes_expansion import (
    SHORT_EVAL_FILE,
    SHORT_TEMPLATES,
    SHORT_TRAIN_FILE,
    all_combos,
    caption_corpus,
    expansion_pairs,
    hides_shape,
    is_faithful_expansion,
    parse_short_caption,
    pen_tokenizer,
    short_caption,
    short_prompts,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_PEN = ROOT / "genalign" / "worlds" / "assets" / "shapes" / "pen"
TEMPERATURE = 1.5  # not 1, so a log-prob computed without the temperature shows
# Prompts of different token lengths and reward prefixes of different lengths, so inputs are left-padded.
PROMPTS = [
    "a red circle at the top left", "blue star, centre", "an orange ring at the bottom right", "green square, top",
]
REWARDS = [(1,), (2, 4), (), (4, 3, 2, 1)]


@pytest.fixture(scope="module")
def tokenizer():
    return pen_tokenizer(caption_corpus(seed=0)[:2000])


def _tiny_lm(tokenizer, *, tied: bool, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    if not tied:
        # A random LM almost never samples EOS; make it likely so that expansions end at different lengths.
        with torch.no_grad():
            direction = torch.randn(32)
            model.transformer.ln_f.bias.copy_(direction / direction.norm() * 3)
            model.lm_head.weight[tokenizer.eos_token_id] = direction / direction.norm() * 1.4
    return model


@pytest.fixture
def pen(tokenizer):
    import copy

    return PromptExpansionNetwork(
        _tiny_lm(tokenizer, tied=False), copy.deepcopy(tokenizer), max_new_tokens=12, temperature=TEMPERATURE
    )


def _rows(expansion: Expansion) -> list[list[int]]:
    return [row[mask].tolist() for row, mask in zip(expansion.token_ids, expansion.mask)]


def _prefix(pen: PromptExpansionNetwork, prompt: str, rewards) -> list[int]:
    """Written out independently of the class: reward tokens, prompt, separator."""
    tok = pen.tokenizer
    reward_ids = [tok.convert_tokens_to_ids(REWARD_TOKEN.format(k=k)) for k in rewards]
    return reward_ids + tok.encode(prompt, add_special_tokens=False) + [tok.convert_tokens_to_ids(SEPARATOR)]


# --- reward tokens --------------------------------------------------------------------------------------------


def test_reward_tokens_are_single_unsplit_tokens_and_survive_save_and_load(pen, tmp_path):
    tok = pen.tokenizer
    assert pen.num_reward_tokens == 4
    ids = [tok.convert_tokens_to_ids(REWARD_TOKEN.format(k=k)) for k in range(1, 5)]
    assert len(set(ids)) == 4
    for k, token_id in enumerate(ids, start=1):
        assert tok.encode(REWARD_TOKEN.format(k=k), add_special_tokens=False) == [token_id]
        assert tok.encode(f"x<reward {k}>y <reward {k}>", add_special_tokens=False).count(token_id) == 2
    assert tok.encode("<reward 2><reward 1>red", add_special_tokens=False)[:2] == [ids[1], ids[0]]

    pen.reward_names = ["aesthetic", "clip", "pick", "sentiment"]
    pen.save_pretrained(tmp_path / "pen")
    loaded = PromptExpansionNetwork.from_pretrained(tmp_path / "pen")
    assert [loaded.tokenizer.convert_tokens_to_ids(REWARD_TOKEN.format(k=k)) for k in range(1, 5)] == ids
    rows = torch.tensor(ids)
    torch.testing.assert_close(
        loaded.model.get_input_embeddings().weight[rows], pen.model.get_input_embeddings().weight[rows], rtol=0, atol=0
    )
    assert (loaded.separator, loaded.max_new_tokens, loaded.temperature) == (SEPARATOR, 12, TEMPERATURE)
    assert loaded.reward_names == pen.reward_names and loaded.num_reward_tokens == 4
    assert not loaded.model.training
    before = pen.expand(PROMPTS, REWARDS, seeds=[1, 2, 3, 4])
    after = loaded.expand(PROMPTS, REWARDS, seeds=[1, 2, 3, 4])
    assert _rows(before) == _rows(after) and before.texts == after.texts


@pytest.mark.parametrize("tied", [True, False])
def test_ensure_reward_tokens_adds_only_missing_ones_with_distinct_rows(tokenizer, tied):
    import copy

    pen = PromptExpansionNetwork(_tiny_lm(tokenizer, tied=tied), copy.deepcopy(tokenizer))
    old_rows = pen.model.get_input_embeddings().weight.detach().clone()
    old_head = pen.model.get_output_embeddings().weight.detach().clone()
    assert pen.ensure_reward_tokens(3) == 0 and pen.ensure_reward_tokens(4) == 0
    assert len(pen.tokenizer) == len(tokenizer) and pen.model.get_input_embeddings().weight.shape == old_rows.shape

    rng_state = torch.get_rng_state()
    assert pen.ensure_reward_tokens(6, seed=3) == 2
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert pen.num_reward_tokens == 6 and len(pen.tokenizer) == len(tokenizer) + 2
    weight = pen.model.get_input_embeddings().weight.detach()
    assert weight.shape == (len(tokenizer) + 2, old_rows.shape[1])
    torch.testing.assert_close(weight[: len(tokenizer)], old_rows, rtol=0, atol=0)  # old rows untouched
    new5, new6 = (pen.tokenizer.convert_tokens_to_ids(REWARD_TOKEN.format(k=k)) for k in (5, 6))
    assert pen.tokenizer.encode("<reward 5><reward 6>", add_special_tokens=False) == [new5, new6]
    assert not torch.equal(weight[new5], weight[new6])
    mean = old_rows.mean(dim=0)
    for row in (weight[new5], weight[new6]):
        assert (row - mean).norm() < 0.5 * (old_rows - mean).norm(dim=1).mean()  # near the mean, not random
    head = pen.model.get_output_embeddings().weight.detach()
    assert head.shape[0] == len(tokenizer) + 2
    if tied:
        assert head.data_ptr() == weight.data_ptr()
    else:
        torch.testing.assert_close(head[: len(tokenizer)], old_head, rtol=0, atol=0)
        torch.testing.assert_close(head[new5], old_head.mean(dim=0))
    # Seeded: the same seed gives the same rows.
    again = PromptExpansionNetwork(_tiny_lm(tokenizer, tied=tied), copy.deepcopy(tokenizer))
    again.ensure_reward_tokens(6, seed=3)
    torch.testing.assert_close(again.model.get_input_embeddings().weight.detach(), weight, rtol=0, atol=0)
    # The new tokens work end to end.
    expansion = pen.expand(["red circle, top"], [(6, 5)], seeds=[0])
    torch.testing.assert_close(pen.log_prob(expansion).detach(), expansion.log_probs, rtol=0, atol=1e-5)


def test_ensure_reward_tokens_on_a_tokenizer_without_any():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(caption_corpus(seed=0)[:500], trainer)
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    pen = PromptExpansionNetwork(_tiny_lm(bare, tied=True), bare, max_new_tokens=4)
    assert pen.num_reward_tokens == 0
    with pytest.raises(ValueError, match="ensure_reward_tokens"):
        pen.expand(["red circle, top"], [(1,)])
    assert pen.ensure_reward_tokens(2) == 2 and pen.num_reward_tokens == 2
    # The separator is plain text for this tokenizer, tokenized like the prompt.
    expansion = pen.expand(["red circle, top"], [(2, 1)], seeds=[0])
    torch.testing.assert_close(pen.log_prob(expansion).detach(), expansion.log_probs, rtol=0, atol=1e-5)


def test_bad_reward_index_names_the_fix(pen):
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match=r"reward tokens 1\.\.4 .*ensure_reward_tokens"):
            pen.expand(["red circle, top"], [(1, bad)])
    with pytest.raises(ValueError, match="ensure_reward_tokens"):
        pen.supervised_loss(["red circle, top"], ["a small red circle at the top on a black background"], [(7,)])
    with pytest.raises(ValueError, match="2 prompts but 1 reward"):
        pen.expand(["a", "b"], [()])


def test_missing_model_path_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*save_pretrained"):
        PromptExpansionNetwork.from_pretrained(tmp_path / "no-such-pen")
    with pytest.raises(ModelLoadError, match="no config.json"):
        PromptExpansionNetwork.from_pretrained(tmp_path)


# --- log-probabilities and gradients --------------------------------------------------------------------------


def test_log_prob_equals_sampled_log_probs_and_a_hand_computation(pen):
    expansion = pen.expand(PROMPTS, REWARDS, seeds=[10, 11, 12, 13])
    lengths = expansion.mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1, "the fixture should give expansions of different lengths"
    assert expansion.log_probs.dtype == torch.float64 and expansion.token_ids.dtype == torch.long
    eos = pen.tokenizer.eos_token_id
    for row, length in zip(_rows(expansion), lengths.tolist()):
        # EOS ends an expansion and is part of it; only an expansion that ran out of tokens lacks it.
        assert (row[-1] == eos) == (length < pen.max_new_tokens) and eos not in row[:-1]
    recomputed = pen.log_prob(expansion)
    assert recomputed.requires_grad and recomputed.dtype == torch.float64
    torch.testing.assert_close(recomputed.detach(), expansion.log_probs, rtol=0, atol=1e-5)

    # One sample by hand: its unpadded sequence alone, token by token, at the temperature.
    i = int(lengths.argmax())
    tokens = _rows(expansion)[i]
    prefix = _prefix(pen, PROMPTS[i], REWARDS[i])
    with torch.no_grad():
        logits = pen.model(input_ids=torch.tensor([prefix + tokens])).logits[0].double()
    total = 0.0
    for j, token in enumerate(tokens):
        total += torch.log_softmax(logits[len(prefix) + j - 1] / TEMPERATURE, dim=-1)[token].item()
    assert expansion.log_probs[i].item() == pytest.approx(total, abs=1e-5)
    text_tokens = tokens[:-1] if tokens[-1] == eos else tokens
    assert expansion.texts[i] == pen.tokenizer.decode(text_tokens, skip_special_tokens=True).strip()


def test_reinforce_gradient_matches_a_per_prefix_loop(pen):
    # In float64 the batched, left-padded, cached path and the unpadded loop agree to rounding; in float32 their
    # different summation orders differ by ~1e-5 relative on near-zero bias gradients, which would hide nothing
    # but make the comparison flaky across CPUs.
    pen.to(dtype=torch.float64)
    expansion = pen.expand(PROMPTS[:3], REWARDS[:3], seeds=[5, 6, 7])
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    params = pen.trainable_parameters()
    assert params and set(params) == {n for n, _ in pen.model.named_parameters()}
    loss = -(weights * pen.log_prob(expansion)).sum()
    grads = torch.autograd.grad(loss, list(params.values()))

    # Independent: for every token, the model's forward on that sample's unpadded prefix, no cache.
    reference = torch.zeros((), dtype=torch.float64)
    for i, tokens in enumerate(_rows(expansion)):
        sequence = _prefix(pen, expansion.prompts[i], expansion.rewards[i]) + tokens
        start = len(sequence) - len(tokens)
        for j in range(start, len(sequence)):
            logits = pen.model(input_ids=torch.tensor([sequence[:j]])).logits[0, -1]
            reference = reference - weights[i] * torch.log_softmax(logits / TEMPERATURE, dim=-1)[sequence[j]]
    expected = torch.autograd.grad(reference, list(params.values()), allow_unused=True)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    for name, got, want in zip(params, grads, expected):
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)
    assert sum(g.abs().sum() for g in grads) > 0


def test_supervised_loss_is_the_token_mean_nll_of_target_and_eos(pen):
    targets = ["a small red circle at the top left on a black background", "top: a big blue disc over grey"]
    prompts, rewards = PROMPTS[:2], REWARDS[:2]
    loss = pen.supervised_loss(prompts, targets, rewards)
    total, count = 0.0, 0
    for prompt, target, reward in zip(prompts, targets, rewards):
        prefix = _prefix(pen, prompt, reward)
        tokens = pen.tokenizer.encode(target, add_special_tokens=False) + [pen.tokenizer.eos_token_id]
        with torch.no_grad():
            logits = pen.model(input_ids=torch.tensor([prefix + tokens])).logits[0]
        log_probs = torch.log_softmax(logits[len(prefix) - 1 : -1], dim=-1)  # temperature 1 for SFT
        total -= log_probs.gather(1, torch.tensor(tokens)[:, None]).sum().item()
        count += len(tokens)
    assert loss.item() == pytest.approx(total / count, abs=1e-5)


# --- seeds and batching ---------------------------------------------------------------------------------------


def test_a_sample_depends_on_its_seed_only_not_on_the_batch(pen):
    seeds = [21, 22, 23, 24]
    together = pen.expand(PROMPTS, REWARDS, seeds=seeds)
    one_by_one = pen.expand(PROMPTS, REWARDS, seeds=seeds, batch_size=1)
    alone = Expansion.cat([pen.expand([p], [r], seeds=[s]) for p, r, s in zip(PROMPTS, REWARDS, seeds)])
    order = [3, 0, 2, 1]
    shuffled = pen.expand(
        [PROMPTS[i] for i in order] + ["purple triangle, bottom"], [REWARDS[i] for i in order] + [(1, 2)],
        seeds=[seeds[i] for i in order] + [99],
    )
    for other in (one_by_one, alone, shuffled[torch.tensor([1, 3, 2, 0])]):
        assert _rows(other) == _rows(together) and other.texts == together.texts
        torch.testing.assert_close(other.log_probs, together.log_probs, rtol=0, atol=1e-5)
    assert _rows(pen.expand(PROMPTS, REWARDS, seeds=seeds)) == _rows(together)  # repeatable
    assert _rows(pen.expand(PROMPTS, REWARDS, seeds=[s + 100 for s in seeds])) != _rows(together)
    # Greedy ignores seeds and matches the argmax of the recomputed distribution.
    greedy = pen.expand(PROMPTS, REWARDS, seeds=seeds, greedy=True)
    assert _rows(greedy) == _rows(pen.expand(PROMPTS, REWARDS, seeds=[0, 0, 0, 0], greedy=True))
    torch.testing.assert_close(pen.log_prob(greedy).detach(), greedy.log_probs, rtol=0, atol=1e-5)


def test_expansion_selection_and_concatenation(pen):
    a = pen.expand(PROMPTS[:2], REWARDS[:2], seeds=[1, 2])
    b = pen.expand(PROMPTS[2:], REWARDS[2:], seeds=[3, 4])
    both = Expansion.cat([a, b])
    assert len(both) == 4 and both.token_ids.shape[1] == max(a.token_ids.shape[1], b.token_ids.shape[1])
    assert _rows(both) == _rows(a) + _rows(b) and both.prompts == PROMPTS and both.rewards == REWARDS
    torch.testing.assert_close(pen.log_prob(both).detach(), both.log_probs, rtol=0, atol=1e-5)
    selections = [([2, 0], [2, 0]), (torch.tensor([2, 0]), [2, 0]), (torch.tensor([True, False, True, False]), [0, 2])]
    for index, rows in selections:
        picked = both[index]
        assert picked.prompts == [both.prompts[i] for i in rows] and _rows(picked) == [_rows(both)[i] for i in rows]
        torch.testing.assert_close(picked.log_probs, both.log_probs[rows])
    assert _rows(both[1:3]) == _rows(both)[1:3] and both[1:3].texts == both.texts[1:3]
    assert both[1:3].token_ids.shape[1] == max(len(r) for r in _rows(both)[1:3])


# --- the committed shapes PEN ---------------------------------------------------------------------------------


@pytest.mark.skipif(not COMMITTED_PEN.exists(), reason="the committed shapes PEN is not in this checkout")
def test_committed_pen_expands_short_prompts_faithfully():
    pen = PromptExpansionNetwork.from_pretrained(COMMITTED_PEN)
    assert pen.num_reward_tokens == 4 and pen.reward_names is None
    held_out = (ROOT / "configs" / "prompts" / SHORT_EVAL_FILE).read_text().splitlines()[:6]
    prompts = held_out + ["a red circle at the top left", "white ring, bottom right"]
    for rewards in ((), (1, 2, 3, 4)):
        expansion = pen.expand(prompts, [rewards] * len(prompts), greedy=True)
        for prompt, text in zip(prompts, expansion.texts):
            assert is_faithful_expansion(prompt, text), (prompt, text)
            assert shapes.parse_caption(text) is not None and parse_short_caption(text) is None
    sampled = pen.expand(prompts * 4, [(1, 2, 3, 4)] * len(prompts) * 4, seeds=range(len(prompts) * 4))
    assert np.mean([is_faithful_expansion(p, t) for p, t in zip(sampled.prompts, sampled.texts)]) >= 0.8
    assert len(set(sampled.texts)) > len(prompts)  # sampling varies the details


# --- the short-prompt grammar ---------------------------------------------------------------------------------


def test_parse_short_caption_inverts_every_phrasing():
    rng = np.random.default_rng(0)
    for shape, colour, position in all_combos():
        spec = ShapeSpec(shape, colour, "large", position)  # the size is never said
        for template in range(len(SHORT_TEMPLATES)):
            text = short_caption(spec, rng, template=template)
            expected = Scene(shapes=(ShapeSpec(shape, colour, None, position),), background=None)
            assert parse_short_caption(text) == expected, text
            assert parse_short_caption(text.upper() + ".") == expected
            assert shapes.parse_caption(text) is None  # never mistaken for a full caption
    assert short_caption(ShapeSpec("ring", "orange", None, "top"), rng, template=0) == "an orange ring at the top"
    assert short_caption(ShapeSpec("ring", "red", None, "top left"), rng, template=1) == "red ring, top left"
    assert parse_short_caption("a small red circle at the top left on a black background") is None
    assert parse_short_caption("a red hexagon at the top") is None


def test_expansion_pairs_are_faithful_and_the_check_catches_changes():
    pairs = expansion_pairs(300, seed=4)
    assert all(parse_short_caption(short) is not None for short, _ in pairs)
    assert all(is_faithful_expansion(short, detailed) for short, detailed in pairs)
    assert len({d for _, d in pairs}) > 250
    assert {short.startswith(("a ", "an ")) for short, _ in pairs} == {True, False}  # both phrasings occur
    assert pairs == expansion_pairs(300, seed=4) and pairs != expansion_pairs(300, seed=5)
    short = "a red circle at the top left"
    assert is_faithful_expansion(short, "a small red circle at the top left on a black background")
    assert is_faithful_expansion(short, "top left: a big red disc over grey")
    assert not is_faithful_expansion(short, "a small blue circle at the top left on a black background")
    assert not is_faithful_expansion(short, "a small red square at the top left on a black background")
    assert not is_faithful_expansion(short, "a small red circle at the top on a black background")
    assert not is_faithful_expansion(
        short, "a small red circle at the top left and a small blue star at the centre on a black background"
    )
    # Faithful (the prompt leaves the background free), but the shape would not show.
    assert is_faithful_expansion("white circle, top left", "a small white circle at the top left on a white background")
    assert hides_shape("a small white circle at the top left on a white background")
    assert not any(hides_shape(detailed) for _, detailed in pairs)
    assert not is_faithful_expansion(short, "a red circle at the top left")  # not a full caption
    assert not is_faithful_expansion(short, "")


def test_short_prompt_files_are_the_recipe_and_disjoint():
    train = (ROOT / "configs" / "prompts" / SHORT_TRAIN_FILE).read_text().splitlines()
    held_out = (ROOT / "configs" / "prompts" / SHORT_EVAL_FILE).read_text().splitlines()
    assert train == short_prompts(16, seed=0) and held_out == short_prompts(32, seed=1, exclude=train)
    assert len(set(train)) == 16 and len(set(held_out)) == 32
    combos = [{(s.shapes[0].shape, s.shapes[0].colour, s.shapes[0].position) for s in map(parse_short_caption, f)}
              for f in (train, held_out)]  # fmt: skip
    assert len(combos[0]) == 16 and len(combos[1]) == 32 and not combos[0] & combos[1]


def test_a_lora_trained_pen_saves_as_a_plain_model_with_its_adapters_merged(tmp_path):
    # configs/parrot_sd15.yaml trains the PEN with LoRA. Fails if LoRA cannot be attached to a transformers LM with
    # the pinned peft (its own `add_adapter` needs a newer one), if `<run>/pen` holds peft's renamed weights
    # (from_pretrained then drops the adapters or fails), or if saving merges the adapters into the live model.
    from genalign.trainer import LoRAConfig
    from pipelines.parrot import PENConfig, prepare_expander

    pen = PromptExpansionNetwork.from_pretrained(COMMITTED_PEN)
    lora = LoRAConfig(enabled=True, rank=4, alpha=4, target_modules=["c_attn"])
    prepare_expander(pen, PENConfig(pretrained=str(COMMITTED_PEN), lora=lora), num_rewards=4)
    params = pen.trainable_parameters()
    assert params and all("lora_" in name for name in params)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = torch.tensor([[5, 9, 14, 2, 30]])
    with torch.no_grad():
        trained = pen.model(input_ids=ids).logits
        base = PromptExpansionNetwork.from_pretrained(COMMITTED_PEN).model(input_ids=ids).logits
    assert (trained - base).abs().max() > 1e-2  # the adapters change the model
    pen.save_pretrained(tmp_path / "pen")
    back = PromptExpansionNetwork.from_pretrained(tmp_path / "pen")
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=ids).logits, trained, rtol=0, atol=1e-4)
        torch.testing.assert_close(pen.model(input_ids=ids).logits, trained, rtol=0, atol=0)
    assert set(pen.trainable_parameters()) == set(params)
