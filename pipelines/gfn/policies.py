"""GFlowNet policies and the trajectory sampler.

A policy is an `nn.Module` whose `forward` evaluates a batch of trajectories — log P_F and log P_B of every
transition and log F of every state, the inputs of every loss in `losses.py` — so that a distributed wrapper
(DDP through accelerate) sees the computation that carries gradients. `step_logits` gives the forward logits of
single states for the sampler (no gradients). Both read an optional conditioning vector per trajectory (MOGFN's
encoded preference and β).

* `GridPolicy` — an MLP on the one-hot coordinates of a HyperGrid state with forward, backward and flow heads.
* `SequencePolicy` — a causal transformer over [BOS; tokens]: position t reads
  the prefix of length t and predicts the next action; one pass evaluates every step of a trajectory.
* `MutationPolicy` — a bidirectional transformer over a design's residues for a `MutationTask` (which
  position to mutate to which residue, or stop).
* `LogPartition` — log Z, a scalar or (conditioned) a small MLP of the conditioning, trained in its own
  parameter group at a higher learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genalign.attention import SwitchableAttention, attention
from pipelines.gfn.environments import Environment, HyperGrid, MutationTask, SequenceTask


@dataclass
class Trajectories:
    """A batch of B trajectories padded to T transitions.

    Attributes:
        states: [B, T+1, D] long; entries past the trajectory's end repeat its final state.
        actions: [B, T] long; −1 past the end.
        lengths: [B] long: n_b, the number of transitions (the stop included).
    """

    states: Tensor
    actions: Tensor
    lengths: Tensor

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def terminals(self) -> Tensor:
        """[B, D] the final state of each trajectory (the completed object)."""
        return self.states[torch.arange(len(self), device=self.states.device), self.lengths]

    def __getitem__(self, index) -> "Trajectories":
        return Trajectories(self.states[index], self.actions[index], self.lengths[index])

    def to(self, device: torch.device | str) -> "Trajectories":
        return Trajectories(self.states.to(device), self.actions.to(device), self.lengths.to(device))

    @staticmethod
    def cat(items: list["Trajectories"]) -> "Trajectories":
        return Trajectories(torch.cat([t.states for t in items]), torch.cat([t.actions for t in items]),
                            torch.cat([t.lengths for t in items]))


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """log-softmax over the allowed entries (−inf elsewhere); a row with nothing allowed gives zeros, not NaN."""
    anything = mask.any(-1, keepdim=True)
    safe = torch.where(anything, mask, torch.ones_like(mask))
    out = torch.log_softmax(logits.masked_fill(~safe, float("-inf")), dim=-1)
    return torch.where(anything, out, torch.zeros_like(out))


def _pick(log_probs: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """log_probs [..., A] at index [...] where valid, else 0 (padding never reaches a −inf entry)."""
    picked = log_probs.gather(-1, index.clamp_min(0)[..., None]).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def _every_state(states: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Trajectory states [B, T+1, D] as one batch [B·(T+1), D], each row with its trajectory's conditioning."""
    b, t1, d = states.shape
    return states.reshape(b * t1, d), None if condition is None else condition.repeat_interleave(t1, dim=0)


def _taken_log_probs(env: Environment, logits: Tensor, flat: Tensor, actions: Tensor,
                     lengths: Tensor) -> tuple[Tensor, Tensor]:
    """log P_F of the actions taken [B, T] (0 past each trajectory's end) from the forward logits of every state
    [B·(T+1), A] (`_every_state` order), and which transitions are real [B, T]."""
    b, steps = actions.shape
    log_probs = _masked_log_softmax(logits, env.forward_mask(flat)).reshape(b, steps + 1, -1)
    valid = torch.arange(steps, device=actions.device)[None, :] < lengths[:, None]
    return _pick(log_probs[:, :-1], actions, valid), valid


def _mlp(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    parts: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        parts += [nn.Linear(width, hidden), nn.LeakyReLU()]
        width = hidden
    parts.append(nn.Linear(width, outputs))
    return nn.Sequential(*parts)


class GridPolicy(nn.Module):
    """P_F, P_B (learned, or uniform over parents) and log F for a `HyperGrid`, from one MLP trunk."""

    def __init__(self, env: HyperGrid, condition_size: int = 0, hidden: int = 64, layers: int = 2,
                 uniform_backward: bool = False) -> None:
        super().__init__()
        self.env = env
        self.uniform_backward = uniform_backward
        self.net = _mlp(env.ndim * env.height + condition_size, hidden, layers,
                        env.num_actions + env.num_backward_actions + 1)

    def _heads(self, states: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """states [N, D] → forward logits [N, A], backward logits [N, D], log F [N]."""
        x = F.one_hot(states, self.env.height).flatten(1).float()
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        out = self.net(x)
        a = self.env.num_actions
        backward = out[:, a:-1]
        if self.uniform_backward:
            backward = torch.zeros_like(backward)
        return out[:, :a], backward, out[:, -1]

    @torch.no_grad()
    def step_logits(self, states: Tensor, condition: Tensor | None) -> Tensor:
        return self._heads(states, condition)[0]

    def forward(self, states: Tensor, actions: Tensor, lengths: Tensor,
                condition: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Trajectories ([B, T+1, D], [B, T], [B]) → log P_F [B, T], log P_B [B, T], log F [B, T+1]."""
        flat, cond = _every_state(states, condition)
        forward_logits, backward_logits, log_flow = self._heads(flat, cond)
        log_pf, valid = _taken_log_probs(self.env, forward_logits, flat, actions, lengths)
        b, t1 = states.shape[:2]
        backward_lp = _masked_log_softmax(backward_logits, self.env.backward_mask(flat)).reshape(b, t1, -1)
        undo = valid & ~self.env.is_stop(actions)
        log_pb = _pick(backward_lp[:, 1:], self.env.backward_action(actions.clamp_min(0)), undo)
        return log_pf, log_pb, log_flow.reshape(b, t1)


class _CausalBlock(SwitchableAttention, nn.Module):
    """A pre-norm transformer block, causal unless `causal=False`; the attention runs on `attention_backend`
    (`genalign.attention`)."""

    def __init__(self, hidden: int, heads: int, causal: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, h: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        """h [B, n, W] → [B, n, W]. With `cache` ([keys, values] of the earlier positions, [B, heads, m, W/heads]
        each, or empty), h holds only the n new positions, attends to the cached ones too, and extends the cache."""
        b, n, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        # One new position attends to every cached one; several new ones from an empty cache are causal.
        causal = self.causal and (cache is None or n > 1)
        if cache is not None and n > 1 and k.shape[2] != n:
            raise ValueError("a cached block takes several new positions only into an empty cache")
        attended = attention(q, k, v, backend=self.attention_backend, is_causal=causal)
        h = h + self.out(attended.transpose(1, 2).reshape(b, n, width))
        return h + self.mlp(self.norm2(h))


class SequencePolicy(nn.Module):
    """An autoregressive transformer for a `SequenceTask`: the conditioning is added to the BOS position's
    embedding; output t (reading BOS and the first t tokens) gives the logits of the action taken in the state
    with t tokens, and a log-flow head gives log F of that state. Causal attention makes one pass over a
    complete sequence evaluate every step of its (unique) trajectory."""

    def __init__(self, env: SequenceTask, condition_size: int = 0, hidden: int = 64, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.env = env
        self.tokens = nn.Embedding(env.vocab_size + 2, hidden)  # the alphabet, the padding, BOS
        self.positions = nn.Embedding(env.max_length + 1, hidden)
        self.condition = nn.Linear(condition_size, hidden) if condition_size else None
        self.blocks = nn.ModuleList([_CausalBlock(hidden, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, env.num_actions + 1)

    def _embed(self, x: Tensor, start: int, condition: Tensor | None) -> Tensor:
        """Token ids x [B, n] at positions start … start+n−1 of [BOS; tokens] → [B, n, W]; the conditioning is
        added at position 0 (BOS)."""
        h = self.tokens(x) + self.positions(torch.arange(start, start + x.shape[1], device=x.device))
        if start == 0 and self.condition is not None and condition is not None:
            h = h + F.pad(self.condition(condition.to(h.dtype))[:, None], (0, 0, 0, x.shape[1] - 1))
        return h

    def _outputs(self, tokens: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        """tokens [B, L] → action logits [B, L+1, A] and log F [B, L+1] of the states with 0 … L tokens."""
        bos = torch.full_like(tokens[:, :1], self.env.vocab_size + 1)
        h = self._embed(torch.cat([bos, tokens], dim=1), 0, condition)
        for block in self.blocks:
            h = block(h)
        out = self.head(self.norm(h))
        return out[..., :-1], out[..., -1]

    def stepper(self, condition: Tensor | None, batch: int) -> "CachedSteps":
        """An incremental decoder for one rollout of `batch` sequences (keys and values of earlier positions
        kept), so that sampling costs one position per step instead of re-reading the whole prefix."""
        return CachedSteps(self, condition, batch)

    @torch.no_grad()
    def step_logits(self, states: Tensor, condition: Tensor | None) -> Tensor:
        logits, _ = self._outputs(states, condition)
        position = self.env.lengths(states)
        return logits[torch.arange(len(states), device=states.device), position]

    def _prefix_mask(self, length: int, device: torch.device) -> Tensor:
        """[L+1, A] the actions allowed in a state with t tokens (row t)."""
        t = torch.arange(length + 1, device=device)[:, None]
        tokens = (t < self.env.max_length).expand(-1, self.env.vocab_size)
        if not self.env.has_stop:
            return tokens
        return torch.cat([tokens, t >= self.env.min_length], dim=1)

    def forward(self, states: Tensor, actions: Tensor, lengths: Tensor,
                condition: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Trajectories ([B, T+1, L], [B, T], [B]) → log P_F [B, T], log P_B = 0 [B, T], log F [B, T+1]."""
        terminals = states[torch.arange(len(states), device=states.device), lengths]
        logits, log_flow = self._outputs(terminals, condition)  # [B, L+1, A], [B, L+1]
        mask = self._prefix_mask(self.env.max_length, states.device)
        log_probs = _masked_log_softmax(logits, mask.expand(len(states), -1, -1))
        steps = actions.shape[1]
        valid = torch.arange(steps, device=states.device)[None, :] < lengths[:, None]
        # Step t acts on the state with t tokens; with a stop action the last step (t = n − 1 ≤ L) reads row n − 1.
        log_pf = _pick(log_probs[:, :steps], actions, valid)
        flows = log_flow[:, : steps + 1] if steps + 1 <= log_flow.shape[1] else F.pad(log_flow, (0, 1))
        return log_pf, torch.zeros_like(log_pf), flows


class CachedSteps:
    """`SequencePolicy.step_logits` for the successive states s_0, s_1, … of one rollout, each step feeding only
    the newest token through the blocks. Call `logits` once per step, in order, with every row's state at that
    step (rows already stopped are read but their logits are meaningless, as the sampler ignores them)."""

    def __init__(self, policy: SequencePolicy, condition: Tensor | None, batch: int) -> None:
        self.policy, self.condition, self.batch = policy, condition, batch
        self.caches: list[list[Tensor]] = [[] for _ in policy.blocks]
        self.step = 0

    @torch.no_grad()
    def logits(self, states: Tensor) -> Tensor:
        """states [B, L] at step t (t tokens written in live rows) → forward logits [B, A]."""
        policy, t = self.policy, self.step
        if t == 0:
            new = torch.full((self.batch, 1), policy.env.vocab_size + 1, dtype=torch.long, device=states.device)
        else:
            new = states[:, t - 1 : t]
        h = policy._embed(new, t, self.condition)
        for block, cache in zip(policy.blocks, self.caches):
            h = block(h, cache)
        self.step += 1
        return policy.head(policy.norm(h))[:, 0, :-1]


class MutationPolicy(nn.Module):
    """A bidirectional transformer for a `MutationTask`: each position reads its residue, its index and whether it
    is mutated, and gives the logits of mutating it to each residue; a summary token (carrying the conditioning,
    the number of mutations made and the position after the last one) gives the stop logit and log F."""

    def __init__(self, env: MutationTask, condition_size: int = 0, hidden: int = 64, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.env = env
        self.residues = nn.Embedding(env.vocab_size, hidden)
        self.positions = nn.Embedding(env.length, hidden)
        self.mutated = nn.Embedding(2, hidden)
        self.summary = nn.Embedding(env.max_edits + 1, hidden)  # indexed by the number of mutations made
        self.next_position = nn.Embedding(env.length + 1, hidden)
        self.condition = nn.Linear(condition_size, hidden) if condition_size else None
        self.blocks = nn.ModuleList([_CausalBlock(hidden, heads, causal=False) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        self.mutation_head = nn.Linear(hidden, env.vocab_size)
        self.summary_head = nn.Linear(hidden, 2)  # stop logit, log F

    def _heads(self, states: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        """states [N, L + 1] → forward logits [N, L·V + 1], log F [N]."""
        env = self.env
        designs = env.designs(states)
        mutated = (designs != env.parent_ids.to(states.device)).long()
        h = self.residues(designs) + self.positions.weight[None] + self.mutated(mutated)
        top = self.summary(mutated.sum(1)) + self.next_position(states[:, env.length])
        if self.condition is not None and condition is not None:
            top = top + self.condition(condition.to(top.dtype))
        h = torch.cat([top[:, None], h], dim=1)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        summary = self.summary_head(h[:, 0])
        logits = torch.cat([self.mutation_head(h[:, 1:]).flatten(1), summary[:, :1]], dim=1)
        return logits, summary[:, 1]

    @torch.no_grad()
    def step_logits(self, states: Tensor, condition: Tensor | None) -> Tensor:
        return self._heads(states, condition)[0]

    def forward(self, states: Tensor, actions: Tensor, lengths: Tensor,
                condition: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Trajectories ([B, T+1, L+1], [B, T], [B]) → log P_F [B, T], log P_B = 0 [B, T], log F [B, T+1]."""
        flat, cond = _every_state(states, condition)
        logits, log_flow = self._heads(flat, cond)
        log_pf, _ = _taken_log_probs(self.env, logits, flat, actions, lengths)
        return log_pf, torch.zeros_like(log_pf), log_flow.reshape(states.shape[:2])


class LogPartition(nn.Module):
    """log Z: one learned number, or log Z(c) = MLP(c) of the conditioning vector c [B, C]."""

    def __init__(self, condition_size: int = 0, hidden: int = 64) -> None:
        super().__init__()
        self.condition_size = condition_size
        if condition_size:
            self.net = _mlp(condition_size, hidden, 2, 1)
        else:
            self.value = nn.Parameter(torch.zeros(()))

    def forward(self, condition: Tensor | None, batch: int) -> Tensor:
        """[B] log Z for each trajectory."""
        if self.condition_size:
            return self.net(condition.float()).squeeze(-1)
        return self.value.expand(batch)


def build_policy(env: Environment, condition_size: int, hidden: int, layers: int, heads: int,
                 uniform_backward: bool) -> nn.Module:
    """The policy for a task: `GridPolicy` for a HyperGrid, `SequencePolicy` for sequence tasks,
    `MutationPolicy` for mutation tasks."""
    if isinstance(env, HyperGrid):
        return GridPolicy(env, condition_size, hidden, layers, uniform_backward)
    if isinstance(env, SequenceTask):
        return SequencePolicy(env, condition_size, hidden, layers, heads)
    if isinstance(env, MutationTask):
        return MutationPolicy(env, condition_size, hidden, layers, heads)
    raise TypeError(f"no GFlowNet policy for a {type(env).__name__}; add one in pipelines/gfn/policies.py")


@torch.no_grad()
def sample_trajectories(env: Environment, policy: nn.Module, uniforms: Tensor, condition: Tensor | None = None, *,
                        epsilon: float = 0.0, temperature: float = 1.0, cached: bool = True) -> Trajectories:
    """Roll out B trajectories with the policy's forward logits, tempered (logits / temperature) and mixed with the
    uniform distribution over allowed actions with weight ε (off-policy exploration; ε = 0, temperature 1 is
    on-policy). The action of step t of row b is the inverse CDF at uniforms[b, t] ([B, T] in [0, 1)), so a row's
    trajectory depends only on its own uniforms and conditioning: sharding rows over processes changes nothing.
    A policy with a `stepper` (the sequence transformer's key–value cache) is stepped incrementally unless
    `cached` is False (the reference path: every step re-reads the whole state).
    """
    batch, steps = uniforms.shape
    if steps < env.max_steps:
        raise ValueError(f"uniforms must have T ≥ {env.max_steps} columns; got {steps}")
    device = uniforms.device
    state = env.initial_states(batch, device)
    states = [state]
    actions = torch.full((batch, env.max_steps), -1, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stepper = policy.stepper(condition, batch) if cached and hasattr(policy, "stepper") else None
    for t in range(env.max_steps):
        mask = env.forward_mask(state)
        live = ~done & mask.any(1)
        if not bool(live.any()):
            states += [state] * (env.max_steps - t)
            break
        logits = stepper.logits(state) if stepper is not None else policy.step_logits(state, condition)
        probs = torch.softmax((logits.double() / temperature)
                              .masked_fill(~mask, float("-inf")), dim=-1)
        allowed = mask.double()
        probs = (1 - epsilon) * probs + epsilon * allowed / allowed.sum(1, keepdim=True).clamp_min(1)
        probs = torch.where(mask, probs, torch.zeros_like(probs)).nan_to_num(0.0)
        cdf = probs.cumsum(1)
        choice = torch.searchsorted(cdf, (uniforms[:, t : t + 1] * cdf[:, -1:]).contiguous(), right=True).squeeze(1)
        last_allowed = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        choice = torch.minimum(choice, last_allowed)
        action = torch.where(live, choice, torch.full_like(choice, -1))
        actions[:, t] = action
        state = torch.where(live[:, None], env.step(state, action.clamp_min(0)), state)
        states.append(state)
        lengths += live.long()
        done |= ~live | env.is_stop(action)
        if not env.has_stop:
            done |= env.is_terminal(state)
    return Trajectories(torch.stack(states[: env.max_steps + 1], dim=1), actions, lengths)
