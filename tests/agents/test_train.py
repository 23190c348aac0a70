"""``persona-gym train-agent`` and the SB3 vector env on the tiny tables (table rater)."""

from __future__ import annotations

import numpy as np
import pytest

from agents.evaluate import make_batch
from agents.policies import SB3Policy, make_policy
from agents.runs import read_run
from agents.sb3_env import SB3VecEnv
from agents.train import AgentConfig, train_agent


def config(tmp_path, tiny_config, **kwargs) -> AgentConfig:
    values = dict(
        timesteps=16,
        n_envs=2,
        n_steps=4,
        batch_size=4,
        checkpoint_every=8,
        out=str(tmp_path),
        env_kwargs=dict(tiny_config),
    )
    return AgentConfig(**{**values, **kwargs})


def test_sb3_vec_env_autoresets_like_sb3(tiny_kwargs):
    env = SB3VecEnv("PersonaML100K-v0", 2, max_episode_steps=3, **tiny_kwargs)
    env.seed(5)
    obs = env.reset()
    assert set(obs) == set(env.observation_space.spaces) and obs["profile"].shape[0] == 2
    for _ in range(3):
        masks = np.stack(env.env_method("action_masks"))
        actions = masks.argmax(axis=1)
        obs, rewards, dones, infos = env.step(actions)
    assert dones.all() and rewards.dtype == np.float32
    assert all("terminal_observation" in i and i["TimeLimit.truncated"] for i in infos)
    assert (obs["step_fraction"] == 0).all()  # already the next episodes' first observations
    assert env.has_attr("action_masks") and env.env_is_wrapped(object) == [False, False]


def test_maskable_ppo_trains_saves_reloads_and_resumes(tmp_path, tiny_config, table_rater, core):
    run_dir = train_agent(config(tmp_path, tiny_config), progress=False, rater=table_rater)
    assert run_dir.name.startswith("PersonaML100K-v0_maskable-ppo_s0_")
    for name in ("model.zip", "run.json", "monitor.csv", "learning_curve.png"):
        assert (run_dir / name).exists(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "model_16_steps.zip",
        "model_8_steps.zip",
    ]
    assert any((run_dir / "tb").rglob("events.out.tfevents.*"))
    policy = make_policy(str(run_dir), core)
    assert isinstance(policy, SB3Policy)
    states = [core.new_episode(np.random.default_rng(0), {"user_id": u}) for u in core.user_ids]
    states[0].allowed[:3] = False
    batch = make_batch(core, states)
    assert batch.masks[np.arange(len(states)), policy.act(batch)].all()
    np.testing.assert_array_equal(
        policy.scores(batch), SB3Policy.load(run_dir / "model.zip").scores(batch)
    )
    # resume: continues from the latest checkpoint to the new total
    resumed = train_agent(
        config(tmp_path, tiny_config, timesteps=24),
        resume=run_dir,
        progress=False,
        rater=table_rater,
    )
    assert resumed == run_dir and read_run(run_dir)["timesteps"] == 24


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_ppo_and_dqn_train(tmp_path, tiny_config, table_rater, algo):
    run_dir = train_agent(
        config(tmp_path, tiny_config, algo=algo, seed=1), progress=False, rater=table_rater
    )
    assert read_run(run_dir)["algo"] == algo and (run_dir / "model.zip").exists()


def test_bad_agent_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="choose from"):
        AgentConfig(algo="a2c")
    with pytest.raises(ValueError, match="timesteps must be >= 1"):
        AgentConfig(timesteps=0)
    with pytest.raises(ValueError, match="unknown env id"):
        SB3VecEnv("CartPole-v1", 1)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        train_agent(AgentConfig(), resume=tmp_path)


def test_progress_is_logged_as_lines_without_a_bar(tmp_path, tiny_config, table_rater, caplog):
    caplog.set_level("INFO", logger="agents.train")
    train_agent(config(tmp_path, tiny_config, timesteps=16), progress=False, rater=table_rater)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines and lines[-1].startswith("step 16/16 (100%)") and "env steps/s" in lines[-1]


def test_env_kwargs_are_parsed_and_checked():
    from persona_gym.envs.config import parse_env_kwargs
    from persona_gym.errors import ConfigError

    assert parse_env_kwargs(["max_episode_steps=30", "compile=true", "leave_rule=model"]) == {
        "max_episode_steps": 30,
        "compile": True,
        "leave_rule": "model",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_env_kwargs(["max_episode_steps"])
    with pytest.raises(ConfigError, match="unknown EnvConfig field"):
        parse_env_kwargs(["horizon=3"])
    with pytest.raises(ConfigError, match="leave_rule must be one of"):
        parse_env_kwargs(["leave_rule=sometimes"])


def test_ctrl_c_saves_a_checkpoint_that_resume_continues(tmp_path, tiny_config, table_rater):
    from agents.runs import latest_checkpoint

    class Interrupting:
        """The table rater, interrupted (as by Ctrl-C) at its 7th call."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def rate(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 7:
                raise KeyboardInterrupt
            return self.inner.rate(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        train_agent(
            config(tmp_path, tiny_config, timesteps=40, checkpoint_every=1000),
            progress=False,
            rater=Interrupting(table_rater),
        )
    (run_dir,) = tmp_path.iterdir()
    path, steps = latest_checkpoint(run_dir)
    assert 0 < steps < 40 and path.is_file()
    resumed = train_agent(
        config(tmp_path, tiny_config, timesteps=40),
        resume=run_dir,
        progress=False,
        rater=table_rater,
    )
    # (SB3 finishes its last rollout of n_steps x n_envs, so a resume may end a little past 40)
    assert (
        read_run(resumed)["timesteps"] >= 40
        and (resumed / f"monitor-{steps}.monitor.csv").is_file()
    )
