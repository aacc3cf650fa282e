"""Parrot's prompt-expansion network (PEN): a causal LM that rewrites a short prompt into a detailed one.

The PEN reads ``<reward k> … prompt SEPARATOR`` and samples the expansion after it, ending with EOS. The
reward tokens say which rewards the expansion should serve (Lee et al. 2024, docs/specs/parrot.md: one token
per reward during training, all of them at inference). Any transformers causal LM works: a hub model, or the
shapes world's tiny GPT-2 (``genalign/worlds/assets/shapes/pen``).

Policy-gradient contract. :meth:`PromptExpansionNetwork.expand` samples without gradients and records the
log-probability of every expansion as sampled (temperature applied); :meth:`PromptExpansionNetwork.log_prob`
recomputes it with gradients in one full forward pass, so REINFORCE is ``-(r * pen.log_prob(e)).mean()``.
Both see the same input layout (left-padded prompt, expansion after it, explicit position ids), and the model
stays in eval mode (no dropout), so at unchanged weights the two agree to float round-off.

Seeding. Each sample owns a CPU ``torch.Generator`` seeded with its seed and draws one Gumbel vector per
generated token, only while it is unfinished; a sample therefore depends on its (prompt, rewards, seed) only,
never on what else is in the batch or on ``batch_size`` (up to float round-off in the logits, which can flip
a draw only at an exact tie).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from genalign.attention import AttentionBackend, set_attention_backend
from genalign.generators.base import ModelLoadError

REWARD_TOKEN = "<reward {k}>"  # 1-based k, as the spec writes it
SEPARATOR = "<expand>"  # default separator between the prompt and its expansion
CONFIG_FILE = "genalign_pen.json"
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_TEMPERATURE = 1.0
# Std of the noise added to a new reward token's embedding row, relative to the existing rows' per-dimension
# std: enough to tell the tokens apart from the first step, small next to what training moves them by.
_NEW_ROW_NOISE = 0.1
_PEN_OPTIONS = ("separator", "max_new_tokens", "temperature", "reward_names")


@dataclass
class Expansion:
    """B sampled expansions.

    Attributes:
        prompts: B input prompts.
        rewards: per sample, the 1-based reward indices whose tokens were prepended (in that order).
        texts: B decoded expansions (the detailed prompts), stripped.
        token_ids: long [B, L]: the sampled expansion tokens (incl. the final EOS when one was sampled); the
            padding after them holds 0 and is never read.
        mask: bool [B, L]: True on sampled tokens (incl. EOS), False on padding.
        log_probs: float64 [B]: sum of log p of the sampled tokens, as sampled (temperature applied).
    """

    prompts: list[str]
    rewards: list[tuple[int, ...]]
    texts: list[str]
    token_ids: Tensor
    mask: Tensor
    log_probs: Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> Expansion:
        """Rows selected by an int, a slice, a list of ints, a long index tensor or a bool mask [B]; L is
        trimmed to the longest selected expansion."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        elif isinstance(index, Tensor):
            rows = (index.nonzero().flatten() if index.dtype == torch.bool else index.flatten()).tolist()
        elif isinstance(index, int):
            rows = [index]
        else:
            rows = [int(i) for i in index]
        rows = [r + len(self) if r < 0 else r for r in rows]
        picked = torch.tensor(rows, dtype=torch.long)
        mask = self.mask[picked]
        length = int(mask.sum(dim=1).max()) if rows else 0
        return Expansion(
            prompts=[self.prompts[r] for r in rows],
            rewards=[self.rewards[r] for r in rows],
            texts=[self.texts[r] for r in rows],
            token_ids=self.token_ids[picked, :length],
            mask=mask[:, :length],
            log_probs=self.log_probs[picked],
        )

    @staticmethod
    def cat(items: Sequence[Expansion]) -> Expansion:
        """Concatenate expansions along the batch, padding token_ids (with 0) and mask to the longest L."""
        if not items:
            raise ValueError("Expansion.cat needs at least one Expansion")
        length = max(item.token_ids.shape[1] for item in items)

        def pad(tensor: Tensor, value: int | bool) -> Tensor:
            return F.pad(tensor, (0, length - tensor.shape[1]), value=value)

        return Expansion(
            prompts=[p for item in items for p in item.prompts],
            rewards=[r for item in items for r in item.rewards],
            texts=[t for item in items for t in item.texts],
            token_ids=torch.cat([pad(item.token_ids, 0) for item in items]),
            mask=torch.cat([pad(item.mask, False) for item in items]),
            log_probs=torch.cat([item.log_probs for item in items]),
        )


def _check_model_source(source: str) -> None:
    """Fail early, naming the fix, for a path-like source that is not a model folder (a typo'd path would
    otherwise be tried as a hub id and fail with a network error)."""
    looks_like_path = source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1]
    if not os.path.isdir(source) and looks_like_path:
        raise ModelLoadError(
            f"prompt-expansion model path '{source}' does not exist; pass a folder written by "
            "PromptExpansionNetwork.save_pretrained (e.g. genalign/worlds/assets/shapes/pen, built by "
            "`python scripts/build_worlds.py shapes --stages pen`) or a hub id of a causal LM such as gpt2"
        )
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelLoadError(
            f"'{source}' has no config.json, so it is not a transformers causal-LM folder; pass a folder written "
            "by PromptExpansionNetwork.save_pretrained or by a transformers model's save_pretrained"
        )


class PromptExpansionNetwork:
    """A transformers causal LM and its tokenizer, used as Parrot's prompt-expansion policy.

    Args:
        model: a causal LM (``AutoModelForCausalLM``); it is put in eval mode.
        tokenizer: its tokenizer; ``"<reward k>"`` tokens are added with :meth:`ensure_reward_tokens`.
        separator: text between the prompt and its expansion (a special token of the tokenizer, or plain
            text, which is then tokenized like any text).
        max_new_tokens: most tokens an expansion may have (EOS included).
        temperature: sampling temperature; log-probabilities are those of the tempered distribution.
        reward_names: optional names of the rewards the tokens were trained for, saved with the model.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        separator: str = SEPARATOR,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        reward_names: Sequence[str] | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; an expansion could never end")
        self.model = model.eval()  # no dropout: sampling and log_prob must compute the same function
        self.tokenizer = tokenizer
        self.separator = separator
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.reward_names = list(reward_names) if reward_names is not None else None

    # --- loading and saving ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path_or_id: str | os.PathLike, *, torch_dtype: torch.dtype | None = None, **kwargs: Any
    ) -> PromptExpansionNetwork:
        """Load a causal LM and its tokenizer from a folder or hub id.

        A folder's ``genalign_pen.json`` (written by :meth:`save_pretrained`) sets ``separator``,
        ``max_new_tokens``, ``temperature`` and ``reward_names``; any of those given as keyword arguments
        override it. Every other keyword goes to ``AutoModelForCausalLM.from_pretrained``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = str(path_or_id)
        _check_model_source(source)
        options: dict[str, Any] = {}
        config_path = Path(source) / CONFIG_FILE
        if config_path.is_file():
            saved = json.loads(config_path.read_text())
            options.update({key: saved[key] for key in _PEN_OPTIONS if key in saved})
        options.update({key: kwargs.pop(key) for key in _PEN_OPTIONS if key in kwargs})
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        tokenizer = AutoTokenizer.from_pretrained(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError):  # an architecture without an SDPA implementation
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        return cls(model, tokenizer, **options)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the model, the tokenizer and genalign_pen.json into ``path``; returns it."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._merged_model().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        config = {
            "separator": self.separator,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "reward_names": self.reward_names,
            "num_reward_tokens": self.num_reward_tokens,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    def _merged_model(self) -> torch.nn.Module:
        """The model itself, or with LoRA adapters (peft layers) a plain copy with them merged into its weights, so
        that the saved folder loads with `from_pretrained` alone."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not any(isinstance(m, BaseTunerLayer) for m in self.model.modules()):
            return self.model
        merged = copy.deepcopy(self.model)
        state = {}
        for module in merged.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        for key, value in merged.state_dict().items():
            if "lora_" not in key:
                state[key.replace(".base_layer.", ".")] = value
        plain = type(self.model)(self.model.config).to(dtype=next(self.model.parameters()).dtype)
        plain.load_state_dict(state)
        plain.generation_config = self.model.generation_config
        return plain

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptExpansionNetwork:
        """Move (and/or cast) the model in place; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def set_attention_backend(self, backend: AttentionBackend) -> dict[str, str]:
        """The LM's attention implementation for `backend` (`genalign.attention`): "eager" for naive, "sdpa"
        otherwise (transformers has no xformers path). Returns {"model": what it now runs}."""
        return set_attention_backend({"model": self.model}, backend)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The model's named parameters with requires_grad (all of them, or only LoRA's after add_lora)."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    # --- reward tokens --------------------------------------------------------------------------------------

    def _token_id(self, token: str) -> int | None:
        """The id of ``token`` if it is one whole token of the vocabulary, else None."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or self.tokenizer.convert_ids_to_tokens(token_id) != token:
            return None  # unknown tokens map to unk, whose text differs
        return int(token_id)

    @property
    def num_reward_tokens(self) -> int:
        """How many ``"<reward k>"`` the tokenizer has, counting k = 1, 2, … up to the first missing one."""
        count = 0
        while self._token_id(REWARD_TOKEN.format(k=count + 1)) is not None:
            count += 1
        return count

    def reward_token_ids(self, rewards: Sequence[int]) -> list[int]:
        """Token ids of ``"<reward k>"`` for 1-based k; ValueError for a k the tokenizer lacks."""
        available = self.num_reward_tokens
        ids = []
        for k in rewards:
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= available:
                raise ValueError(
                    f"reward index {k!r} is out of range: this PEN has reward tokens 1..{available} (1-based); "
                    "add more with PromptExpansionNetwork.ensure_reward_tokens(count)"
                )
            ids.append(self._token_id(REWARD_TOKEN.format(k=k)))
        return ids

    def ensure_reward_tokens(self, count: int, *, seed: int = 0) -> int:
        """Make sure ``"<reward 1>"`` … ``"<reward count>"`` exist; returns how many were added.

        Missing ones become special tokens (never split by the tokenizer), the embeddings (and an untied LM
        head) are resized, and each new input row is the mean of the existing rows plus N(0, (0.1 std)^2)
        noise drawn from a generator seeded by (seed, k), so different reward tokens are distinguishable
        even before training. An untied LM head's new rows are the mean of its existing rows. Torch's global
        RNG is left untouched.
        """
        from tokenizers import AddedToken

        wanted = [REWARD_TOKEN.format(k=k) for k in range(1, count + 1)]
        missing = [token for token in wanted if self._token_id(token) is None]
        if not missing:
            return 0
        self.tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        new_ids = [self._token_id(t) for t in missing]
        embeddings = self.model.get_input_embeddings()
        old_rows = embeddings.weight.shape[0]
        with torch.random.fork_rng(devices=[]):  # resizing initialises rows from the global RNG
            if max(new_ids) >= old_rows:
                self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        keep = torch.ones(old_rows, dtype=torch.bool)
        keep[[i for i in new_ids if i < old_rows]] = False
        with torch.no_grad():
            weight = self.model.get_input_embeddings().weight
            existing = weight[:old_rows][keep].float()
            mean, std = existing.mean(dim=0), existing.std(dim=0)
            for token, token_id in zip(missing, new_ids):
                k = int(token.removeprefix("<reward ").removesuffix(">"))
                generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
                noise = torch.randn(weight.shape[1], generator=generator) * _NEW_ROW_NOISE * std
                weight[token_id] = (mean + noise).to(weight.dtype)
            head = self.model.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != weight.data_ptr():
                head_mean = head.weight[:old_rows][keep].float().mean(dim=0).to(head.weight.dtype)
                head.weight[new_ids] = head_mean
                if getattr(head, "bias", None) is not None:
                    head.bias[new_ids] = head.bias[:old_rows][keep].mean()
        return len(missing)

    # --- inputs ---------------------------------------------------------------------------------------------

    def _prefix_ids(self, prompt: str, rewards: Sequence[int]) -> list[int]:
        """[BOS if the tokenizer adds one] + reward tokens + prompt + separator, as token ids."""
        tokenizer = self.tokenizer
        lead: list[int] = []
        if tokenizer.bos_token_id is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            tokenizer.bos_token_id
        ]:
            lead = [tokenizer.bos_token_id]
        # Tokenized piece by piece, so a prompt's text can never merge with or fake a special token.
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        separator_ids = tokenizer(self.separator, add_special_tokens=False)["input_ids"]
        return lead + self.reward_token_ids(rewards) + prompt_ids + separator_ids

    def _prefixes(self, prompts: Sequence[str], rewards: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        if len(rewards) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} reward lists")
        return [self._prefix_ids(p, tuple(r)) for p, r in zip(prompts, rewards)]

    @staticmethod
    def _left_pad(prefixes: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
        """Token lists -> ids [B, P] left-padded with pad_id, and the bool attention mask [B, P]."""
        width = max(len(p) for p in prefixes)
        ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(prefixes), width, dtype=torch.bool)
        for row, prefix in enumerate(prefixes):
            if prefix:
                ids[row, width - len(prefix) :] = torch.tensor(prefix, dtype=torch.long)
                mask[row, width - len(prefix) :] = True
        return ids, mask

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def _eos_ids(self) -> set[int]:
        ids = {int(self.tokenizer.eos_token_id)}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if configured is not None:
            ids.update(int(i) for i in ([configured] if isinstance(configured, int) else configured))
        return ids

    def _continuation_log_probs(
        self, prefixes: Sequence[Sequence[int]], token_ids: Tensor, mask: Tensor, temperature: float
    ) -> Tensor:
        """log softmax(logits / temperature) at ``token_ids`` given each prefix, in one full forward pass.

        prefixes: B token lists; token_ids long [B, L] and mask bool [B, L] (True on real tokens, which come
        first in each row). Returns [B, L] in float32 or the model's wider dtype, 0 where mask is False,
        differentiable.
        """
        device = self.device
        prefix_ids, prefix_mask = self._left_pad(prefixes, self._pad_id)
        width = prefix_ids.shape[1]
        length = token_ids.shape[1]
        ids = torch.cat([prefix_ids, token_ids.cpu().masked_fill(~mask.cpu(), self._pad_id)], dim=1).to(device)
        attention = torch.cat([prefix_mask, mask.cpu().bool()], dim=1).to(device)
        positions = (attention.long().cumsum(dim=1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=ids, attention_mask=attention.long(), position_ids=positions, use_cache=False
        ).logits
        # Position width - 1 + j predicts continuation token j.
        logits = logits[:, width - 1 : width - 1 + length]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, width:, None]).squeeze(-1)
        return torch.where(mask.to(device), picked, torch.zeros_like(picked))

    # --- sampling and scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def expand(
        self,
        prompts: Sequence[str],
        rewards: Sequence[Sequence[int]],
        *,
        seeds: Sequence[int] | None = None,
        greedy: bool = False,
        batch_size: int | None = None,
    ) -> Expansion:
        """Sample one expansion per prompt, with ``"<reward k>"`` for each k of ``rewards[i]`` prepended.

        Args:
            prompts: B short prompts.
            rewards: B sequences of 1-based reward indices (each within 1..num_reward_tokens; may be empty).
            seeds: B ints, one generator per sample; default: drawn from torch's global RNG.
            greedy: take the argmax token instead of sampling (log_probs are still the tempered ones).
            batch_size: most samples per forward pass (default: all B at once); results do not depend on it.
        """
        prefixes = self._prefixes(prompts, rewards)
        if seeds is None:
            seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            empty = torch.zeros(0, 0)
            return Expansion([], [], [], empty.long(), empty.bool(), torch.zeros(0, dtype=torch.float64))
        step = batch_size or len(prompts)
        chunks = [
            self._expand_batch(
                list(prompts[i : i + step]), [tuple(r) for r in rewards[i : i + step]], prefixes[i : i + step],
                [int(s) for s in seeds[i : i + step]], greedy,
            )
            for i in range(0, len(prompts), step)
        ]
        return chunks[0] if len(chunks) == 1 else Expansion.cat(chunks)

    def _expand_batch(
        self,
        prompts: list[str],
        rewards: list[tuple[int, ...]],
        prefixes: list[list[int]],
        seeds: list[int],
        greedy: bool,
    ) -> Expansion:
        device = self.device
        batch = len(prompts)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        eos = torch.tensor(sorted(self._eos_ids()))
        ids, attention = self._left_pad(prefixes, self._pad_id)
        ids, attention = ids.to(device), attention.long().to(device)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        next_position = positions[:, -1] + 1
        sampled = torch.zeros(batch, self.max_new_tokens, dtype=torch.long)
        alive = torch.ones(batch, dtype=torch.bool)
        lengths = torch.zeros(batch, dtype=torch.long)
        log_probs = torch.zeros(batch, dtype=torch.float64)
        cache_name = self._cache_argument()
        past = None
        for t in range(self.max_new_tokens):
            out = self.model(
                input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_name: past},
            )
            past = getattr(out, cache_name)
            last = out.logits[:, -1]
            last = last.to(torch.promote_types(last.dtype, torch.float32))
            scores = torch.log_softmax(last / self.temperature, dim=-1).cpu()  # [B, V]
            if greedy:
                choice = scores.argmax(dim=-1)
            else:
                # Gumbel-max with one generator per sample, drawn only while the sample runs, so a sample's
                # draws do not depend on the other rows.
                choice = torch.zeros(batch, dtype=torch.long)
                for row in alive.nonzero().flatten().tolist():
                    uniform = torch.rand(scores.shape[1], generator=generators[row], dtype=torch.float64)
                    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
                    choice[row] = (scores[row].double() + gumbel).argmax()
            choice = torch.where(alive, choice, torch.zeros_like(choice))
            sampled[:, t] = choice
            log_probs += torch.where(alive, scores.gather(1, choice[:, None]).squeeze(1).double(), 0.0)
            lengths += alive.long()
            alive &= ~torch.isin(choice, eos)
            if not alive.any():
                break
            ids = choice[:, None].to(device)  # finished rows feed 0; their outputs are never read
            attention = torch.cat([attention, torch.ones(batch, 1, dtype=attention.dtype, device=device)], dim=1)
            positions = next_position[:, None]
            next_position = next_position + 1
        length = int(lengths.max())
        token_ids = sampled[:, :length]
        mask = torch.arange(length)[None, :] < lengths[:, None]
        token_ids = token_ids.masked_fill(~mask, 0)
        texts = [self._decode(row[m].tolist()) for row, m in zip(token_ids, mask)]
        return Expansion(prompts, rewards, texts, token_ids, mask, log_probs)

    def _cache_argument(self) -> str:
        # transformers 5.x renamed past_key_values to cache (the old name warns); older models only know it.
        forward = getattr(self.model, "forward", None)
        try:
            parameters = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            return "past_key_values"
        return "cache" if "cache" in parameters else "past_key_values"

    def _decode(self, token_ids: list[int]) -> str:
        eos = self._eos_ids()
        if token_ids and token_ids[-1] in eos:
            token_ids = token_ids[:-1]
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

    def log_prob(self, expansion: Expansion) -> Tensor:
        """float64 [B], differentiable w.r.t. the LM's parameters: the sum over each expansion's sampled
        tokens of log softmax(logits / temperature), recomputed in one full forward pass (no cache). Equals
        ``expansion.log_probs`` to float round-off at unchanged weights."""
        prefixes = self._prefixes(expansion.prompts, expansion.rewards)
        per_token = self._continuation_log_probs(prefixes, expansion.token_ids, expansion.mask, self.temperature)
        return per_token.double().sum(dim=1)

    def target_ids(self, target: str) -> list[int]:
        """The tokens a supervised target is trained as: its text, then EOS."""
        return self.tokenizer(target, add_special_tokens=False)["input_ids"] + [int(self.tokenizer.eos_token_id)]

    def supervised_loss(
        self, prompts: Sequence[str], targets: Sequence[str], rewards: Sequence[Sequence[int]]
    ) -> Tensor:
        """Scalar token-mean NLL (temperature 1) of ``targets[i]`` + EOS given reward tokens + prompt +
        separator: supervised fine-tuning on (short, detailed) prompt pairs."""
        if len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        prefixes = self._prefixes(prompts, rewards)
        encoded = [self.target_ids(t) for t in targets]
        length = max(len(e) for e in encoded)
        token_ids = torch.zeros(len(encoded), length, dtype=torch.long)
        mask = torch.zeros(len(encoded), length, dtype=torch.bool)
        for row, ids in enumerate(encoded):
            token_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = True
        per_token = self._continuation_log_probs(prefixes, token_ids, mask, 1.0)
        return -per_token.sum() / mask.sum()
