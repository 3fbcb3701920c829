"""AMC-style reinforcement learning (optional extra: ``pip install autoprune[rl]``).

A gymnasium environment walks the searchable channel groups in model order; at each step the
agent picks a keep ratio in [0, 1] for the current group. The budget is enforced by limiting the
remaining actions: a ratio is capped to the widest width for which the plan, with every group
still to come at its narrowest width, is predicted within the budget; so every episode ends in a
feasible plan. At the end of an episode the plan is evaluated as one Optuna trial and the proxy
is the reward (0 if the proxy failed). The agent is a Stable-Baselines3 PPO (default), SAC or
DDPG. Only ``channel`` keep ratios are chosen (2:4, unstructured and block removal stay off),
as in AMC. On resume the study keeps its trials; the agent starts learning afresh.

State per step: [step / T, group units / widest group, group's share of dense MACs, predicted
latency so far / dense, budget / dense, previous action].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoprune.errors import InvalidInputError
from autoprune.strategies.base import MAXIMIZE, SearchProblem, Strategy
from autoprune.types import Structure

if TYPE_CHECKING:
    import optuna

AgentName = Literal["ppo", "sac", "ddpg"]
_INSTALL = "pip install autoprune[rl]  (gymnasium and stable-baselines3)"


def _require_rl() -> tuple[Any, Any]:
    try:
        import gymnasium
        import stable_baselines3
    except ImportError as e:
        raise InvalidInputError(
            f"strategy 'rl' needs gymnasium and stable-baselines3, which are missing ({e.name}); "
            f"install them with: {_INSTALL}"
        ) from None
    return gymnasium, stable_baselines3


def make_env(problem: SearchProblem, max_episodes: int | None = None) -> Any:
    """The pruning environment for ``problem`` (a ``gymnasium.Env``)."""
    gym, _ = _require_rl()
    from gymnasium import spaces

    space = problem.space
    groups = [c for c in space.searchable_groups
              if c.kind == "channel" and Structure.CHANNEL in c.structures and len(c.widths) > 1]
    if not groups:
        raise InvalidInputError("strategy 'rl' found no channel group with widths to choose")
    spec = space.spec
    dense_macs, _ = spec.count()
    macs_share = []
    for c in groups:
        g = spec.groups[c.name]
        m = sum(spec.layers[n].spec.macs for n in g.members if n in spec.layers)
        macs_share.append(m / max(dense_macs, 1))
    max_units = max(c.units for c in groups)

    class PruningEnv(gym.Env):  # type: ignore[misc, name-defined]
        metadata: dict[str, Any] = {"render_modes": []}

        def __init__(self) -> None:
            super().__init__()
            self.observation_space = spaces.Box(-np.inf, np.inf, shape=(6,), dtype=np.float32)
            self.action_space = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
            self.episodes = 0
            self.best = -np.inf
            dense_plan = space.decode(self._params([len(c.widths) - 1 for c in groups]))
            self.dense_ms = float(problem.latency_ms([dense_plan])[0])

        def _params(self, idxs: list[int]) -> dict[str, Any]:
            p: dict[str, Any] = {}
            for c, i in zip(groups, idxs):
                if len(c.structures) > 1:
                    p[f"structure:{c.name}"] = Structure.CHANNEL.value
                p[f"keep:{c.name}"] = int(i)
            return p

        def _obs(self) -> np.ndarray:
            t = self.t
            c = groups[min(t, len(groups) - 1)]
            return np.array([
                t / len(groups), c.units / max_units, macs_share[min(t, len(groups) - 1)],
                self.cur_ms / self.dense_ms, problem.budget_ms / self.dense_ms, self.prev,
            ], dtype=np.float32)

        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
                  ) -> tuple[np.ndarray, dict[str, Any]]:
            super().reset(seed=seed)
            self.t = 0
            self.idxs = [len(c.widths) - 1 for c in groups]
            self.prev = 1.0
            self.cur_ms = self.dense_ms
            return self._obs(), {}

        def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
            c = groups[self.t]
            a = float(np.clip(np.asarray(action).reshape(-1)[0], 0.0, 1.0))
            # widest width still allowing the budget with every later group at its narrowest
            trial_idxs = []
            for i in range(len(c.widths)):
                idxs = list(self.idxs[: self.t]) + [i] + [0] * (len(groups) - self.t - 1)
                trial_idxs.append(idxs)
            lats = np.asarray(problem.latency_ms(
                [space.decode(self._params(ix)) for ix in trial_idxs]), dtype=float)
            ok = np.nonzero(lats <= problem.budget_ms)[0]
            cap = int(ok.max()) if len(ok) else 0
            idx = min(int(round(a * (len(c.widths) - 1))), cap)
            self.idxs[self.t] = idx
            self.prev = c.widths[idx] / c.units
            self.cur_ms = float(lats[idx])
            self.t += 1
            if self.t < len(groups):
                return self._obs(), 0.0, False, False, {}
            _, proxy = problem.run_params(self._params(self.idxs), 1)
            self.episodes += 1
            reward = float(proxy) if proxy is not None else 0.0
            self.best = max(self.best, reward)
            return self._obs(), reward, True, False, {"proxy": proxy}

    return PruningEnv()


class RLStrategy(Strategy):
    """AMC-style agent (see the module docstring). ``agent``: ppo (default), sac or ddpg."""

    name = "rl"
    directions = [MAXIMIZE]

    def __init__(self, agent: AgentName = "ppo", learning_rate: float = 3e-4,
                 episodes_per_update: int = 4) -> None:
        self.agent = agent
        self.learning_rate = learning_rate
        self.episodes_per_update = episodes_per_update

    def sampler(self, seed: int) -> Any:
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)  # unused: every trial is enqueued

    def run(self, problem: SearchProblem, n_trials: int, timeout_s: float | None = None
            ) -> optuna.Study:
        _, sb3 = _require_rl()
        import time

        if self.agent not in ("ppo", "sac", "ddpg"):
            raise InvalidInputError(f"unknown RL agent {self.agent!r}; allowed: ppo, sac, ddpg")
        study = self.open(problem)
        problem.drain_waiting(self.n_objectives)
        remaining = n_trials - problem.n_done(study)
        if remaining <= 0:
            return study
        env = make_env(problem)
        n_steps = len([c for c in problem.space.searchable_groups if c.kind == "channel"
                       and Structure.CHANNEL in c.structures and len(c.widths) > 1])
        common = {"learning_rate": self.learning_rate, "seed": problem.seed, "verbose": 0,
                  "device": "cpu"}
        if self.agent == "ppo":
            rollout = n_steps * self.episodes_per_update
            model = sb3.PPO("MlpPolicy", env, n_steps=rollout, batch_size=rollout, n_epochs=5,
                            gamma=1.0, **common)
        elif self.agent == "sac":
            model = sb3.SAC("MlpPolicy", env, learning_starts=n_steps * 2, gamma=1.0, **common)
        else:
            model = sb3.DDPG("MlpPolicy", env, learning_starts=n_steps * 2, gamma=1.0, **common)

        t0 = time.monotonic()
        from stable_baselines3.common.callbacks import BaseCallback

        class _Stop(BaseCallback):
            def _on_step(self) -> bool:
                if not any(np.asarray(self.locals.get("dones", [False])).reshape(-1)):
                    return True  # only check at the end of an episode (a trial)
                if problem.n_done(study) >= n_trials:
                    return False
                return timeout_s is None or time.monotonic() - t0 < timeout_s

        model.learn(total_timesteps=remaining * n_steps, callback=_Stop())
        self.model_ = model
        return study
