"""A YAML reader for untrusted configs: size-limited, alias-expansion-limited, duplicate keys refused.

PyYAML's `safe_load` builds no arbitrary objects, but it reads files of any size, lets a 441-byte
file of nested anchors stand for billions of values (the graph is shared, so building it is cheap;
anything that walks or prints it is not), and silently keeps the last of two equal keys. Here each
of those is a `YamlError` naming the file and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

MAX_YAML_BYTES = 1 << 20  # a run config is a few KiB; 1 MiB leaves room for long prompt lists
MAX_EXPANDED_NODES = 100_000  # scalars + collections after expanding every alias


class YamlError(ValueError):
    """A YAML text that is too large, malformed, an alias bomb, or has a duplicate key."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise YamlError(f"line {line}: key {shorten(key)} appears twice in one mapping; "
                                    "fix: keep one (YAML would silently use the last)")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    """Nodes under `node` counting every alias as a full copy; memoised, so linear in the file's size."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = limit + 1  # a cycle (refused by PyYAML's composer anyway) counts as too large
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, memo, limit)
        if size > limit:
            break
    memo[key] = size
    return size


def shorten(value: Any, limit: int = 80) -> str:
    """A short, bounded rendering of a value for error messages (never the repr of a whole container)."""
    if isinstance(value, str):
        return repr(value[:limit]) + (f"... ({len(value)} characters)" if len(value) > limit else "")
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return f"a {type(value).__name__}"


def load_yaml_text(text: str, source: str, max_nodes: int = MAX_EXPANDED_NODES) -> Any:
    """Parse one YAML document with the safe constructors; raises `YamlError` naming `source`."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, max_nodes) > max_nodes:
            raise YamlError(f"{source}: its aliases expand to more than {max_nodes} values (an alias bomb?); "
                            "fix: write the values out, or use fewer nested anchors")
        return loader.construct_document(node)
    except YamlError as err:
        message = str(err)
        raise YamlError(message if message.startswith(source) else f"{source}: {message}") from None
    except yaml.YAMLError as err:
        raise YamlError(f"{source}: not valid YAML ({shorten(str(err), 300)}); fix: correct the syntax") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | os.PathLike, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Read and parse a YAML file, refusing one over `max_bytes` before reading it and non-UTF-8 text."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise YamlError(f"{p}: {size} bytes, over the limit of {max_bytes} bytes for a YAML config; "
                        "fix: point at the run config itself (datasets belong in .jsonl/.parquet files)")
    raw = p.read_bytes()[: max_bytes + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YamlError(f"{p}: not UTF-8 text (invalid byte at offset {err.start}); "
                        "fix: re-encode the file as UTF-8") from None
    return load_yaml_text(text, str(p))
