"""Which names hold secrets, and masking their values in configs, logs and printed text.

A name is secret when its last word (words split on `_`, `-` and `.`, any case) is TOKEN, SECRET,
PASSWORD, PASSWD or CREDENTIALS, or its last two are API KEY, SECRET KEY, ACCESS KEY or PRIVATE
KEY: `HF_TOKEN`, `WANDB_API_KEY`, `tracking.api_key` are secret; `max_new_tokens`, `tokenizer`,
`token_budget` are not. Values are masked wherever they appear, so a secret copied into an
ordinary field (a prompt, a project name, a package URL) is masked too.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

REDACTED = "***"
SECRET_LAST_WORDS = frozenset({"token", "secret", "password", "passwd", "credentials"})
SECRET_LAST_PAIRS = frozenset({("api", "key"), ("secret", "key"), ("access", "key"), ("private", "key")})
MIN_SECRET_LEN = 6  # shorter values would mask ordinary text


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable name holds a secret (see the module docstring)."""
    words = [w for w in re.split(r"[_\-.]", name.lower()) if w]
    if not words:
        return False
    return words[-1] in SECRET_LAST_WORDS or tuple(words[-2:]) in SECRET_LAST_PAIRS


def environment_secrets(environ: dict[str, str] | None = None, names: Iterable[str] = ()) -> set[str]:
    """Values of the environment's secret variables and of `names` (at least MIN_SECRET_LEN characters)."""
    env = os.environ if environ is None else environ
    wanted = set(names)
    return {v for k, v in env.items() if (is_secret_name(k) or k in wanted) and len(v) >= MIN_SECRET_LEN}


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value replaced by REDACTED, longest first (a secret inside another is masked whole)."""
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact(obj: Any, secret_values: set[str] | None = None) -> Any:
    """Replace values under secret names, and any known secret value inside strings, with REDACTED."""
    secrets = secret_values if secret_values is not None else environment_secrets()
    if isinstance(obj, dict):
        return {k: REDACTED if is_secret_name(str(k)) and v else redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return mask(obj, secrets)
    return obj


def secret_values_in(obj: Any) -> set[str]:
    """String values under secret names anywhere in a nested dict/list (e.g. a config given a token)."""
    if isinstance(obj, dict):
        found = set()
        for k, v in obj.items():
            if is_secret_name(str(k)) and isinstance(v, str):
                found.add(v)
            found |= secret_values_in(v)
        return found
    if isinstance(obj, (list, tuple)):
        return set().union(*map(secret_values_in, obj))
    return set()


def argv_secrets(argv: Iterable[str]) -> set[str]:
    """Values of `key=value` command-line overrides whose last key is a secret name."""
    out = set()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and is_secret_name(key.split(".")[-1]) and value:
            out.add(value)
    return out
