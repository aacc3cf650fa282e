"""GFlowNets — samplers with p(x) ∝ R(x)^β: trajectory balance, detailed balance, sub-trajectory balance, the
preference-conditional multi-objective variant (MOGFN-PC; Jain et al., ICML 2023) and the order-preserving
variant (OP-GFN; Chen & Mauch, NeurIPS 2023). Spec: ../shared/specs/gflownets.md.

Each update:

1. draws `batch_size` fresh trajectories from the policy (tempered by `temperature` and mixed with uniform
   actions by `epsilon`; both 0/1 is on-policy). Global trajectory i has its own random stream (its uniforms,
   its preference ω_i ~ Dirichlet(α) and its β), so the update is the same on any number of processes;
2. scores them (one reward call each: the task's K objectives) and adds them to the replay buffer; draws
   `replay_batch` stored trajectories (with fresh preferences; no reward call);
3. evaluates every trajectory under the current policy — log P_F, log P_B and log F of each step — and minimises

   * tb:    (log Z(ω) + Σ log P_F − β·log R(x|ω) − Σ log P_B)²
   * db:    (log F(s) + log P_F(s'|s) − log F(s') − log P_B(s|s'))² per transition, F(x) = R(x|ω)^β
   * subtb: Σ_{i<j} λ^{j−i}(log F(s_i) + Σ_{i..j−1}(log P_F − log P_B) − log F(s_j))² / Σ λ^{j−i}
   * op:    OP-GFN, no scalar reward: the implied log r̂(x) = Σ log P_F − Σ log P_B (+ log Z, which the softmax ignores; or, with
            `op_balance: subtb`, the learned terminal flow kept consistent by SubTB) is pushed by cross-entropy
            towards the uniform distribution over the batch's Pareto set (K > 1) or by the pairwise order
            loss (K = 1);
   * reinforce: the baseline — a preference-conditioned policy gradient on the same scalarised R(x|ω) (at
            β = 1: it maximises E[R], and R^β would flatten its advantages): −(R − mean R)/std R · Σ log P_F.

   with the log-flow of the initial state tied to log Z(ω) (it is the partition function), so DB and SubTB
   train log Z in its group too. log R(x|ω) is the scalarisation of the objectives (`scalarisation`: weighted
   sum, Tchebycheff min_k ω_k R_k, log-convex Σ ω_k log R_k; `rewards.pareto`); with one objective it is log R.
   With K > 1 and `conditional`, the policy and log Z read ω's thermometer encoding (and β's, when `beta_range`
   draws β per trajectory).

log Z is its own parameter group at `log_z_learning_rate` (about 100× the policy's, as the papers do).
Under several processes every loss but op is a mean over the global batch; op's softmax runs over each
process's share of it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch

from genalign.attention import apply_attention_backend, run_device
from genalign.config import AtLeast, ConfigError, NonNegativeInt, PositiveFloat, PositiveInt, to_dict
from genalign.engine import gather_rows
from genalign.trainer import LoRAConfig, ParameterGroup, Trainer, TrainerConfig
from pipelines.gfn import losses
from pipelines.gfn.environments import Environment, build_task
from pipelines.gfn.evaluation import evaluate_policy
from pipelines.gfn.policies import LogPartition, Trajectories, build_policy, sample_trajectories
from pipelines.gfn.preferences import dirichlet, scalarised_log_reward, thermometer
from pipelines.gfn.replay import ReplayBuffer, replay_actions


@dataclass
class TaskConfig:
    """A task of `pipelines.gfn.environments.TASKS` by name, with its settings."""

    name: str = "hypergrid"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyConfig:
    hidden: PositiveInt = 64
    layers: PositiveInt = 2
    heads: PositiveInt = 4  # sequence policies only
    uniform_backward: bool = False  # HyperGrid: P_B uniform over parents instead of learned


@dataclass
class GFlowNetEvalConfig:
    """Held-out evaluation every `every` updates: `samples_per_preference` samples at each preference of the
    simplex grid with `preference_divisions` steps per side (one set for a single objective)."""

    every: PositiveInt = 50
    preference_divisions: PositiveInt = 4
    samples_per_preference: PositiveInt = 128
    seed: int = 10_000


def _trainer_without_lora() -> TrainerConfig:
    return TrainerConfig(learning_rate=1e-3, lora=LoRAConfig(enabled=False), weight_decay=0.0)


@dataclass
class GFlowNetConfig:
    pipeline: Literal["gflownet"] = "gflownet"
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    trainer: TrainerConfig = field(default_factory=_trainer_without_lora)
    eval: GFlowNetEvalConfig = field(default_factory=GFlowNetEvalConfig)
    epochs: PositiveInt = 1000  # optimiser updates
    objective: Literal["tb", "db", "subtb", "op", "reinforce"] = "tb"
    subtb_lambda: PositiveFloat = 0.9
    op_balance: Literal["none", "subtb"] = "none"
    scalarisation: Literal["weighted_sum", "tchebycheff", "log_convex"] = "tchebycheff"
    preference_alpha: PositiveFloat = 1.0
    conditional: bool = True  # K > 1: condition the policy and log Z on ω (MOGFN-PC)
    condition_bins: PositiveInt = 50
    beta: PositiveFloat = 1.0
    beta_range: list[float] = field(default_factory=list)  # [low, high]: β ~ U(low, high) per trajectory, conditioned on
    log_z_learning_rate: Annotated[float, AtLeast(0)] = 0.1
    batch_size: PositiveInt = 64  # fresh trajectories (= reward calls) per update, over all processes
    replay_capacity: NonNegativeInt = 0
    replay_batch: NonNegativeInt = 0  # replayed trajectories per update, over all processes
    epsilon: Annotated[float, AtLeast(0)] = 0.0
    temperature: PositiveFloat = 1.0


class _PolicyModules:
    """What the `Trainer` needs of a model: the policy as the one trainable module."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.modules = {"policy": policy}

    def to(self, device=None, dtype=None) -> "_PolicyModules":
        self.modules["policy"].to(device)
        return self

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.modules["policy"]}

    def set_training_modules(self, modules: dict[str, torch.nn.Module]) -> None:
        self.wrapped = modules["policy"]

    def keep_reference_copy(self) -> None:
        """GFlowNets train from scratch: there is no pretrained model to keep."""


class GFlowNetPipeline:
    """GFlowNet training on a task of `pipelines.gfn.environments` (see the module docstring)."""

    config_class = GFlowNetConfig

    def __init__(self, config: GFlowNetConfig, env: Environment | None = None) -> None:
        c = config
        if c.trainer.lora.enabled:
            raise ConfigError("GFlowNet policies are trained from scratch, not adapted: set trainer.lora.enabled: false")
        if c.beta_range and (len(c.beta_range) != 2 or not 0 < c.beta_range[0] <= c.beta_range[1]):
            raise ConfigError(f"beta_range must be [low, high] with 0 < low ≤ high; got {c.beta_range}")
        if bool(c.replay_batch) != bool(c.replay_capacity):
            raise ConfigError("replay_batch and replay_capacity go together: set both (off-policy replay) or neither")
        if c.epsilon > 1:
            raise ConfigError(f"epsilon is a probability of a uniform action; got {c.epsilon}")
        if c.objective == "reinforce" and (c.epsilon or c.temperature != 1 or c.replay_capacity):
            # Off-policy samples without importance weights bias the policy gradient, and a negative advantage
            # on an exploratory action drives its log-probability to −∞ (measured: the loss diverged to −6,000).
            raise ConfigError("objective: reinforce is an on-policy baseline: set epsilon: 0, temperature: 1 and "
                              "replay_capacity: 0, replay_batch: 0")
        self.config = c
        self.env = env or build_task(c.task.name, c.task.kwargs)
        self.num_objectives = len(self.env.objective_names)
        self.conditioned_on_preference = self.num_objectives > 1 and c.conditional and c.objective != "op"
        size = (self.num_objectives * c.condition_bins if self.conditioned_on_preference else 0)
        size += c.condition_bins if c.beta_range else 0
        self.condition_size = size
        with torch.random.fork_rng(devices=[]):  # the initial weights follow the run's seed, not the caller's RNG
            torch.manual_seed(c.trainer.seed)
            self.policy = build_policy(self.env, size, c.policy.hidden, c.policy.layers, c.policy.heads,
                                       c.policy.uniform_backward)
            self.log_z = LogPartition(size, c.policy.hidden)
        self.attention = apply_attention_backend(c.trainer.attention, run_device(), policy=self.policy)
        self.replay = (ReplayBuffer(c.replay_capacity, self.env.max_steps, self.num_objectives)
                       if c.replay_capacity else None)

    # ------------------------------------------------------------------ conditioning and rewards
    def condition(self, preferences: torch.Tensor, betas: torch.Tensor) -> torch.Tensor | None:
        """The policy's and log Z's input for [B, K] preferences and [B] β: their thermometer encodings."""
        c = self.config
        parts = []
        if self.conditioned_on_preference:
            parts.append(thermometer(preferences, c.condition_bins))
        if c.beta_range:
            low, high = c.beta_range
            position = (betas - low) / (high - low) if high > low else torch.zeros_like(betas)
            parts.append(thermometer(position[:, None], c.condition_bins))
        return torch.cat(parts, dim=1) if parts else None

    def log_reward(self, objectives: torch.Tensor, preferences: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """β·log R(x|ω) [B] float64."""
        if self.num_objectives == 1:
            return betas * torch.log(objectives[:, 0])
        return scalarised_log_reward(objectives, preferences, self.config.scalarisation, betas)

    def draws(self, seed: int, epoch: int, index: np.ndarray, stream: str = "fresh") -> tuple[torch.Tensor, ...]:
        """Per global trajectory: uniforms [n, T], preferences [n, K], β [n], each from that trajectory's own
        generator (so any sharding over processes draws the same)."""
        c = self.config
        uniforms, preferences, betas = [], [], []
        for i in index.tolist():
            g = torch.Generator().manual_seed(_stream_seed(seed, epoch, stream, int(i)))
            uniforms.append(torch.rand(self.env.max_steps, generator=g, dtype=torch.float64))
            preferences.append(dirichlet(1, self.num_objectives, c.preference_alpha, g)[0])
            betas.append(float(torch.empty((), dtype=torch.float64).uniform_(*c.beta_range, generator=g))
                         if c.beta_range else c.beta)
        empty = torch.empty(0, dtype=torch.float64)
        return (torch.stack(uniforms) if uniforms else empty.reshape(0, self.env.max_steps),
                torch.stack(preferences) if preferences else empty.reshape(0, self.num_objectives),
                torch.tensor(betas, dtype=torch.float64))

    # ------------------------------------------------------------------ the loss
    def loss(self, trainer: Trainer, trajectories: Trajectories, objectives: torch.Tensor,
             preferences: torch.Tensor, betas: torch.Tensor,
             transitions: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """This process's loss on its share of the update's batch. `transitions` (DB): the global batch's real
        transitions per process, so that the processes' mean (what the gradient sync takes) is the global DB."""
        c = self.config
        device = trainer.device
        trajectories = trajectories.to(device)
        condition = self.condition(preferences, betas)
        condition = None if condition is None else condition.to(device)
        log_pf, log_pb, log_flows = self.trained_policy(trajectories.states, trajectories.actions,
                                                        trajectories.lengths, condition)
        log_z = self.log_z(condition, len(trajectories)).to(log_pf.dtype)
        log_flows = torch.cat([log_z[:, None], log_flows[:, 1:]], dim=1)
        log_r = self.log_reward(objectives.to(device), preferences.to(device), betas.to(device)).to(log_pf.dtype)
        lengths = trajectories.lengths
        if c.objective == "tb":
            loss = losses.trajectory_balance(log_pf, log_pb, lengths, log_r, log_z)
        elif c.objective == "db":
            loss = losses.detailed_balance(log_pf, log_pb, log_flows, lengths, log_r, transitions)
        elif c.objective == "subtb":
            loss = losses.subtrajectory_balance(log_pf, log_pb, log_flows, lengths, log_r, c.subtb_lambda)
        elif c.objective == "op":
            loss = self._order_loss(log_pf, log_pb, log_flows, lengths, log_z, objectives.to(device))
        else:
            # REINFORCE maximises E[R(x|ω)]: β is a GFlowNet's temperature, and R^β with a large β leaves rewards
            # so small that their spread vanishes (measured: the policy stalls once std R^16 < 1e-8).
            reward = self.log_reward(objectives.to(device), preferences.to(device),
                                     torch.ones_like(betas, device=device)).exp().to(log_pf.dtype)
            advantage = (reward - reward.mean()) / (reward.std() + 1e-8) if len(reward) > 1 else reward * 0
            loss = -(advantage * log_pf.sum(1)).mean()  # log P_F is 0 on padding; P_B plays no part in sampling
        return loss, {"log_z": float(log_z.detach().mean())}

    def _order_loss(self, log_pf, log_pb, log_flows, lengths, log_z, objectives) -> torch.Tensor:
        c = self.config
        if c.op_balance == "subtb":
            # The learned flow into the last state is the implied reward; SubTB keeps the flows consistent with it.
            terminal_flow = log_flows.gather(1, lengths[:, None]).squeeze(1)
            if self.env.has_stop:  # log F(x) + log P_F(stop | x)
                last = log_pf.gather(1, (lengths - 1)[:, None]).squeeze(1)
                terminal_flow = log_flows.gather(1, (lengths - 1)[:, None]).squeeze(1) + last
            log_r_hat = terminal_flow
            balance = losses.subtrajectory_balance(log_pf, log_pb, log_flows, lengths, log_r_hat, c.subtb_lambda)
        else:
            # log Z would shift every log r̂ alike, which the softmax ignores: it is left out (Adam would otherwise
            # turn the rounding noise of its zero gradient into steps).
            log_r_hat = losses.trajectory_log_ratio(log_pf, log_pb, lengths)
            balance = log_r_hat.new_zeros(())
        if self.num_objectives > 1:
            order = losses.pareto_order_loss(log_r_hat, objectives)
        else:
            order = losses.pairwise_order_loss(log_r_hat, objectives[:, 0])
        return order + balance

    # ------------------------------------------------------------------ training
    def train(self) -> dict[str, float]:
        c = self.config
        trainer = Trainer(
            _PolicyModules(self.policy), c.trainer, accumulation_steps=1, total_updates=c.epochs,
            run_config=to_dict(c),
            extra_parameters={"log_z": ParameterGroup(dict(self.log_z.named_parameters()), c.log_z_learning_rate,
                                                      weight_decay=0.0)},
        )
        self.trained_policy = trainer.generator.wrapped
        start, state = trainer.resume_if_requested()
        if self.replay is not None and state.get("replay"):
            self.replay.load_state_dict(state["replay"])
        self.reward_calls = int(state.get("reward_calls", 0))
        p, rank = trainer.num_processes, trainer.process_index
        for name, total in (("batch_size", c.batch_size), ("replay_batch", c.replay_batch)):
            if total % p:
                raise ConfigError(f"{name}={total} must split evenly over {p} processes")
        if start == 0:
            trainer.log(self.evaluate(trainer), step=-1)
        last: dict[str, float] = {}
        for epoch in trainer.epochs(start, c.epochs):
            tic = time.time()
            local = np.arange(rank, c.batch_size, p)
            uniforms, preferences, betas = self.draws(c.trainer.seed, epoch, local)
            condition = self.condition(preferences, betas)
            fresh = sample_trajectories(
                self.env, self.policy, uniforms.to(trainer.device),
                None if condition is None else condition.to(trainer.device),
                epsilon=c.epsilon, temperature=c.temperature,
            )
            objectives = self.env.objectives(fresh.terminals)
            self.reward_calls += c.batch_size
            actions, lengths, terminals, every_objective = (
                gather_rows(trainer, t, local, c.batch_size)
                for t in (fresh.actions, fresh.lengths, fresh.terminals, objectives))
            batch, batch_objectives = fresh, objectives.cpu()
            if self.replay is not None:
                self.replay.add(actions, lengths, every_objective)
                g = torch.Generator().manual_seed(_stream_seed(c.trainer.seed, epoch, "replay draw"))
                stored_actions, stored_lengths, stored = self.replay.sample(c.replay_batch, g)
                mine = np.arange(rank, c.replay_batch, p)
                replayed = replay_actions(self.env, stored_actions[mine].to(trainer.device),
                                          stored_lengths[mine].to(trainer.device))
                _, replay_preferences, replay_betas = self.draws(c.trainer.seed, epoch, mine, stream="replay")
                batch = Trajectories.cat([fresh, replayed])
                batch_objectives = torch.cat([batch_objectives, stored[mine]])
                preferences = torch.cat([preferences, replay_preferences])
                betas = torch.cat([betas, replay_betas])
            transitions = (float(trainer.gather(batch.lengths.to(trainer.device)).sum()) / p
                           if c.objective == "db" else None)
            with trainer.accumulate():
                with trainer.autocast():
                    loss, extra = self.loss(trainer, batch, batch_objectives, preferences, betas, transitions)
                trainer.backward(loss)
                trainer.optimizer_step()
            metrics = {
                "loss": float(trainer.gather(loss.detach()[None].float()).mean()),
                **{f"objective_{name}": float(every_objective[:, k].mean())
                   for k, name in enumerate(self.env.objective_names)},
                "unique_fraction": float(len(torch.unique(terminals, dim=0)) / c.batch_size),
                "reward_calls": float(self.reward_calls),
                "samples_per_s": c.batch_size / (time.time() - tic),
                "lr": trainer.learning_rate,
                "grad_norm": trainer.last_grad_norm,
                **extra,
            }
            if (epoch + 1) % c.eval.every == 0 or epoch + 1 == c.epochs:
                metrics.update(self.evaluate(trainer))
            trainer.log(metrics, step=epoch)
            trainer.maybe_checkpoint(epoch, c.epochs, self.state())
            last = metrics
        self.trainer = trainer
        return last

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds beside the weights: the replay buffer and the reward-call count."""
        return {"replay": self.replay.state_dict() if self.replay is not None else {},
                "reward_calls": self.reward_calls}

    def evaluate(self, trainer: Trainer | None = None) -> dict[str, float]:
        """Held-out metrics of the current policy (EMA weights if any): see `pipelines.gfn.evaluation`."""
        with trainer.ema_weights() if trainer is not None else contextlib.nullcontext():
            return evaluate_policy(self, self.config.eval).metrics


def _stream_seed(seed: int, epoch: int, stream: str, *index: int) -> int:
    """A 63-bit seed for one random stream, the same in every process (Python's str hash is salted per process)."""
    words = np.frombuffer(stream.encode(), dtype=np.uint8).astype(np.uint32).tolist()
    return int(np.random.SeedSequence([seed, epoch, *words, *index]).generate_state(2, np.uint64)[0] >> np.uint64(1))
