"""The child side of `rlhf_ray.reward_process`: `python -m rlhf_ray.reward_worker package.module:function`.

Writes `{"ready": true}` once the function is imported (or `{"error": ...}` and exits 1), then
answers each JSON line {prompt, response, row} on stdin with one JSON line: {"value": v} for a
JSON-native result, {"unsupported": type name} for anything else, {"error": "Type: message"} when
the function raised. The function's own output on stdout goes to stderr, never into the protocol.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO

MAX_ERROR_CHARS = 500


def _send(out: IO[str], obj: dict) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def _reply_value(value: object) -> dict:
    if value is None or isinstance(value, (bool, int, float)):
        return {"value": value}
    if isinstance(value, str):
        return {"value": value[:100]}  # refused by the parent's guard anyway; bounded on the pipe
    return {"unsupported": type(value).__name__}


def main(path: str) -> int:
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the user's prints land on stderr
    sys.stdout = sys.stderr
    from rlhf_ray.rewards import RewardFunctionError, load_reward_fn

    try:
        fn = load_reward_fn(path)
    except RewardFunctionError as err:
        _send(protocol, {"error": str(err)[:MAX_ERROR_CHARS]})
        return 1
    except BaseException as err:  # SystemExit and KeyboardInterrupt at import are reported like any error
        cause = f"called sys.exit({err.code!r})" if isinstance(err, SystemExit) else f"raised {_describe(err)}"
        _send(protocol, {"error": f"reward function {path!r}: importing its module {cause}"})
        return 1
    _send(protocol, {"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = _reply_value(fn(request["prompt"], request["response"], request["row"]))
        except Exception as err:  # a user function may raise anything; the parent names it and the row
            reply = {"error": _describe(err)}
        _send(protocol, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
