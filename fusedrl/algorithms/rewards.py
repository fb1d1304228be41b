"""Rule-based reward functions and loading them from an import path.

A reward function maps one sample to a scalar::

    fn(prompt: str, response: str, label: str | None) -> float

Configs name it as ``"package.module:function"``, as ``"path/to/file.py:function"``
(loaded from the file, like verl's ``custom_reward_function.path``), or by a
name in :data:`BUILTIN_REWARDS` (``"arithmetic"``, and those a plug-in registers with
:func:`register_reward`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

__all__ = ["RewardFn", "RewardError", "load_reward_fn", "register_reward", "call_reward",
           "reward_name", "arithmetic_reward", "last_integer", "BUILTIN_REWARDS"]

RewardFn = Callable[[str, str, "str | None"], float]

_INT_RE = re.compile(r"-?\d+")


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` (``"37+58=95."`` -> 95), or ``None``."""
    matches = _INT_RE.findall(text)
    return int(matches[-1]) if matches else None


def arithmetic_reward(prompt: str, response: str, label: str | None) -> float:
    """1.0 if the last integer in ``response`` equals the integer ``label``, else 0.0.

    For :func:`fusedrl.data.tasks.arithmetic_task` prompts (``What is 37+58?`` with
    label ``"95"``). Raises ``ValueError`` if the sample has no integer label, since
    that is a data/config mismatch, not a wrong answer.
    """
    if label is None:
        raise ValueError("arithmetic_reward needs a label (the expected integer), got None")
    try:
        expected = int(str(label).strip())
    except ValueError:
        raise ValueError(f"arithmetic_reward: label {label!r} is not an integer") from None
    return 1.0 if last_integer(response) == expected else 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {"arithmetic": arithmetic_reward}


def register_reward(name: str):
    """Decorator making ``fn(prompt, response, label) -> float`` the reward
    ``reward.function: NAME`` (a plug-in's way to add one, :mod:`fusedrl.plugins`)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_reward: name must be a non-empty string without ':', "
                         f"got {name!r}")

    def deco(fn: RewardFn) -> RewardFn:
        old = BUILTIN_REWARDS.get(name)
        if old is not None and old is not fn:
            raise ValueError(f"reward function {name!r} is already registered "
                             f"({getattr(old, '__qualname__', old)})")
        _check_signature(fn, name)
        BUILTIN_REWARDS[name] = fn
        return fn

    return deco


_FILE_MODULES: dict[str, ModuleType] = {}  # resolved .py path -> module
_FILE_MODULE_PATHS: dict[str, str] = {}  # module name given to a file -> its path


class RewardError(ValueError):
    """A reward function that failed on a sample; the message names the function, the
    sample and the exception or value (one line)."""


def _import_module(module_path: str, spec: str, what: str = "reward function") -> ModuleType:
    """Import ``module_path``: a dotted module name or a ``.py`` file path. Errors name
    ``what`` and ``spec`` (the config value being resolved)."""
    if module_path.endswith(".py"):
        file = Path(module_path)
        if not file.is_file():
            raise ValueError(f"{what} {spec!r}: file {module_path!r} does not exist")
        key = str(file.resolve())
        if key not in _FILE_MODULES:
            # Deliberately not put in sys.modules: cloudpickle (Ray) then ships the
            # function by value to workers that cannot import the file by name.
            name = "_fusedrl_reward_" + hashlib.sha1(key.encode()).hexdigest()[:12]
            mod_spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(mod_spec)
            try:
                mod_spec.loader.exec_module(module)
            except Exception as e:
                raise ValueError(
                    f"{what} {spec!r}: importing {module_path!r} failed: {e!r}"
                ) from e
            _FILE_MODULES[key] = module
            _FILE_MODULE_PATHS[name] = module_path
        return _FILE_MODULES[key]
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_path + ".").startswith(
            e.name + "."
        ):  # the module itself is missing
            raise ValueError(f"{what} {spec!r}: no module named {module_path!r}") from e
        raise ValueError(f"{what} {spec!r}: importing {module_path!r} failed: {e}") from e
    except Exception as e:
        raise ValueError(
            f"{what} {spec!r}: importing {module_path!r} failed: {e!r}"
        ) from e


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve ``"module:function"``, ``"file.py:function"`` or a built-in name.

    Raises ``ValueError`` with a one-line message naming ``spec`` when the module or
    file is missing or fails to import, the function does not exist, or the attribute
    is not callable.
    """
    what = "reward function"
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            "reward function must be 'module:function' or one of "
            f"{sorted(BUILTIN_REWARDS)}, got {spec!r}"
        )
    spec = spec.strip()
    if ":" not in spec:
        if spec in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[spec]
        raise ValueError(
            f"{what} {spec!r} is not 'module:function' nor a built-in "
            f"({', '.join(sorted(BUILTIN_REWARDS))})"
        )
    module_path, _, attr = spec.rpartition(":")
    if not module_path or not attr:
        raise ValueError(f"{what} {spec!r} is not of the form 'module:function'")
    module = _import_module(module_path, spec)
    fn = module
    for part in attr.split("."):  # allow "module:Class.method"
        if not hasattr(fn, part):
            raise ValueError(f"{what} {spec!r}: {module_path!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(
            f"{what} {spec!r}: {attr!r} is a {type(fn).__name__}, not callable"
        )
    _check_signature(fn, spec)
    return fn


def _check_signature(fn, name: str) -> None:
    """A :class:`RewardError` unless ``fn`` accepts ``(prompt, response, label)``
    positionally; checked when the function is loaded, before any run starts."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: checked when called
        return
    try:
        sig.bind("prompt", "response", "label")
    except TypeError as e:
        raise RewardError(f"reward function {name}{sig} does not take (prompt, response, "
                          f"label): {e}") from None


def reward_name(fn) -> str:
    """``module:qualname`` of a reward function (``path/file.py:name`` for one loaded
    from a file)."""
    module = getattr(fn, "__module__", None) or "?"
    module = _FILE_MODULE_PATHS.get(module, module)
    return f"{module}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def _short(text: str, limit: int = 120) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def call_reward(fn, index: int, prompt: str, response: str, label) -> float:
    """``fn(prompt, response, label)`` as a finite float, or a :class:`RewardError` naming
    the function, the sample ``index`` and what went wrong: an exception (also
    ``SystemExit``, so a reward cannot end the run silently), a wrong signature, or a
    value that is not a finite real number (``None``, a string, NaN, inf). A bad reward
    would otherwise become a NaN advantage that the policy is trained on."""
    name = reward_name(fn)
    where = f"reward function {name} on sample {index}"
    try:
        value = fn(prompt, response, label)
    except SystemExit as e:
        raise RewardError(f"{where}: called sys.exit({e.code!r})") from None
    except Exception as e:
        if isinstance(e, TypeError):
            _check_signature(fn, name)  # wrong signature: say so, not just "TypeError"
        msg = _short(str(e))
        raise RewardError(f"{where}: raised {type(e).__name__}" + (f": {msg}" if msg else "")
                          ) from None
    # Python and numpy numbers (bool included: a pass/fail reward), 0-d arrays/tensors.
    if isinstance(value, numbers.Real) or getattr(value, "ndim", None) == 0:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise RewardError(f"{where}: returned {number!r}, not a finite number")
            return number
    raise RewardError(f"{where}: returned {_short(repr(value), 80)} ({type(value).__name__}), "
                      f"not a number")
