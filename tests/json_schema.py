"""Validate a JSON document against a JSON Schema: with `jsonschema` when it is installed, else
with the subset of draft 2020-12 our schemas use (type, required, properties,
additionalProperties, items, minimum, maximum, exclusiveMinimum, $ref to #/$defs)."""

from __future__ import annotations

from typing import Any

TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def validate(document: Any, schema: dict) -> None:
    """Raise AssertionError naming the path of the first violation."""
    try:
        import jsonschema
    except ImportError:
        _check(document, schema, schema, "$")
    else:
        jsonschema.validate(document, schema)


def _check(value: Any, node: dict, root: dict, path: str) -> None:
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        node = root["$defs"][name]
    kind = node.get("type")
    if kind is not None:
        ok = isinstance(value, TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        assert ok, f"{path}: {value!r} is not of type {kind}"
    if "minimum" in node:
        assert value >= node["minimum"], f"{path}: {value} < minimum {node['minimum']}"
    if "maximum" in node:
        assert value <= node["maximum"], f"{path}: {value} > maximum {node['maximum']}"
    if "exclusiveMinimum" in node:
        assert value > node["exclusiveMinimum"], f"{path}: {value} <= exclusiveMinimum {node['exclusiveMinimum']}"
    if isinstance(value, dict):
        missing = [k for k in node.get("required", []) if k not in value]
        assert not missing, f"{path}: missing {missing}"
        properties = node.get("properties", {})
        if node.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            assert not extra, f"{path}: unexpected {extra}"
        for key, sub in properties.items():
            if key in value:
                _check(value[key], sub, root, f"{path}.{key}")
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            _check(item, node["items"], root, f"{path}[{i}]")
