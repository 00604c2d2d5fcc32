"""The one reward registry: decorator, `deliberate.rewards` entry points, Hydra `_target_`.

A reward plugin is a callable `(Sample) -> RewardResult | None`; `None` means "not applicable"
(e.g. an effort reward on a sample without effort). A plugin may also be a *class* whose instances are
such callables: `get_reward(name, **options)` instantiates it, so configurable rewards
(budgets, timeouts) need no second mechanism. An object with a `score_batch(samples)` method is
scored a batch at a time by `rewards.compose.CompositeReward` (math-verify uses a process pool).

Three ways in, one lookup:
- `@register_reward("name")` on a function or class in this repo or in user code;
- the entry-point group `deliberate.rewards` for third-party packages, loaded lazily on the first
  lookup of a name that is not registered yet:
      [project.entry-points."deliberate.rewards"]
      my_reward = "my_pkg.rewards:my_reward"
- `build_reward({"_target_": "pkg.mod.Cls", ...})` instantiated by Hydra.

An unknown name fails with a `KeyError` listing every valid name.
"""
from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Optional

from envs.types import Sample
from rewards.types import RewardResult

ENTRY_POINT_GROUP = "deliberate.rewards"
RewardFn = Callable[[Sample], Optional[RewardResult]]

_REGISTRY: dict[str, Any] = {}
_entry_points_loaded = False


def register_reward(name: str):
    """Decorator registering a reward function (or a class of callable rewards) under `name`.

    >>> @register_reward("always_one")
    ... def always_one(sample):
    ...     return RewardResult(score=1.0, parts={"one": 1.0})
    >>> get_reward("always_one")(None).score
    1.0
    """

    def deco(obj):
        if not callable(obj):
            raise TypeError(f"reward {name!r} must be callable (a function or a class), got {obj!r}")
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old) != _qualname(obj):
            raise ValueError(
                f"reward name {name!r} is already registered by {_qualname(old)}; "
                f"pick another name for {_qualname(obj)}"
            )
        _REGISTRY[name] = obj  # same qualname: a module reload, keep the newest
        return obj

    return deco


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _load_entry_points() -> None:
    """Register third-party plugins once; a broken plugin fails naming its package and target."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue  # an explicit registration wins over a plugin of the same name
        try:
            obj = ep.load()
        except Exception as exc:
            dist = getattr(ep.dist, "name", None) or "an unknown package"
            raise ImportError(
                f"reward plugin {ep.name!r} = {ep.value!r} (entry point group {ENTRY_POINT_GROUP!r}, "
                f"declared by {dist!r}) failed to import: {type(exc).__name__}: {exc}; fix or "
                f"uninstall {dist!r}"
            ) from exc
        register_reward(ep.name)(obj)


def available_rewards() -> list[str]:
    """Every valid reward name (built-in, decorated and entry-point plugins)."""
    _ensure_builtins()
    _load_entry_points()
    return sorted(_REGISTRY)


def _ensure_builtins() -> None:
    import rewards  # noqa: F401  (importing the package registers the built-in rewards)


def get_reward(name: str, **options) -> RewardFn:
    """The reward called `name`; classes are instantiated with `options`.

    Raises KeyError listing valid names when `name` is unknown.
    """
    _ensure_builtins()
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown reward {name!r}; valid names: {', '.join(sorted(_REGISTRY))}. Register one with "
            f"@register_reward({name!r}) or an entry point in group {ENTRY_POINT_GROUP!r}"
        )
    obj = _REGISTRY[name]
    if inspect.isclass(obj):
        return obj(**options)
    if options:
        raise TypeError(
            f"reward {name!r} is a plain function and takes no options (got {sorted(options)}); "
            "register a class to make it configurable"
        )
    return obj


def build_reward(spec: str | Mapping | RewardFn) -> RewardFn:
    """A reward from config: a name, `{"name": ..., **options}`, a Hydra `{"_target_": ...}` dict,
    or an already-built callable (returned as is)."""
    if isinstance(spec, str):
        return get_reward(spec)
    if isinstance(spec, Mapping):
        spec = _plain(spec)
        if "_target_" in spec:
            from hydra.utils import instantiate

            return instantiate(spec, _convert_="all")
        if "name" in spec:
            options = {k: v for k, v in spec.items() if k != "name"}
            return get_reward(spec["name"], **options)
        raise ValueError(
            f"reward spec {dict(spec)} has neither 'name' nor '_target_'; use e.g. "
            "{'name': 'math'} or {'_target_': 'rewards.effort.EffortLengthReward'}"
        )
    if callable(spec):
        return spec
    raise TypeError(f"cannot build a reward from {type(spec).__name__}: give a name, a dict or a callable")


def _plain(spec: Mapping) -> dict:
    """OmegaConf containers to plain dicts so options reach constructors as dict/list."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(spec, DictConfig):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # omegaconf ships with hydra; plain dicts still work without it
        pass
    return dict(spec)
