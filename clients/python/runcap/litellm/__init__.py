"""runcap for the LiteLLM proxy (the ``runcap[litellm]`` extra).

In the proxy's config.yaml::

    litellm_settings:
      callbacks: ["runcap.litellm.budget_hook"]

`budget_hook` is a `RuncapBudgetHook` made on first use from the RUNCAP_*
environment (`HookSettings.from_env`). To set it up in code instead, make
your own instance in a module of yours and name that in the config. See
docs/litellm.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runcap.litellm.settings import HookSettings

if TYPE_CHECKING:
    from runcap.litellm.hook import RuncapBudgetHook

__all__ = ["HookSettings", "RuncapBudgetHook", "budget_hook"]

_instance: RuncapBudgetHook | None = None


def __getattr__(name: str) -> Any:
    # Lazy, so importing this package neither imports LiteLLM nor reads the
    # environment until the proxy asks for the hook.
    global _instance
    if name == "RuncapBudgetHook":
        from runcap.litellm.hook import RuncapBudgetHook

        return RuncapBudgetHook
    if name == "budget_hook":
        if _instance is None:
            from runcap.litellm.hook import RuncapBudgetHook

            _instance = RuncapBudgetHook()
        return _instance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
