"""Reward plugins and their registry (docs/ARCHITECTURE.md). Importing the package registers the built-ins:
"math", "effort_length", "format", "safety" (a spec-reading judge on safety tasks), "hierarchy" (secrets and
developer rules kept), "code" (hidden tests in the sandbox). See `rewards.registry` for adding your own."""
from rewards.registry import available_rewards, build_reward, get_reward, register_reward
from rewards import code_reward, effort, format, hierarchy, math_verify_reward, safety  # noqa: F401,E402  (registration)
from rewards.compose import CompositeReward  # noqa: E402

__all__ = ["available_rewards", "build_reward", "get_reward", "register_reward", "CompositeReward"]
