"""Reading the ``CMI_*`` environment switches: one rule for every yes/no and whole-number setting.

A yes/no switch takes ``1 / true / yes / on`` or ``0 / false / no / off`` (any case, surrounding
spaces ignored); unset or empty gives the default. A whole-number setting takes a positive whole
number. Anything else is an :class:`EnvSettingError` naming the variable, the value and what is
accepted: a misspelt switch is never silently read as "off".

This module imports nothing but the standard library: the Kaggle script reads its settings with
it as soon as the code dataset is on ``sys.path``, before torch is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class EnvSettingError(ValueError):
    """An environment variable holds a value its setting does not accept; the message says which."""


def _setting_text(name: str, environ: Mapping[str, str] | None) -> str:
    """The variable's value without surrounding spaces; "" when it is unset."""
    return (os.environ if environ is None else environ).get(name, "").strip()


def env_flag(name: str, default: bool | None, environ: Mapping[str, str] | None = None) -> bool | None:
    """The yes/no switch ``name`` (``default`` when unset or empty)."""
    text = _setting_text(name, environ)
    if not text:
        return default
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise EnvSettingError(
        f"{name}={text!r} is not a yes/no value: use one of {', '.join(TRUE_WORDS)} (on) or "
        f"{', '.join(FALSE_WORDS)} (off), any case; unset it for the default"
    )


def env_positive_int(name: str, default: int | None, environ: Mapping[str, str] | None = None) -> int | None:
    """The whole-number setting ``name``, at least 1 (``default`` when unset or empty)."""
    text = _setting_text(name, environ)
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise EnvSettingError(
            f"{name} must be a positive whole number (e.g. 1), got {text!r}; unset it for the default"
        )
    return int(text)
