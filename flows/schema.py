"""A tool's `parameters`: checked as JSON Schema when the flow loads, and used to check the arguments
the model gives before the tool runs.

This covers the part of JSON Schema that function-calling models read (types, properties, required,
enum, items, and the `anyOf`/`oneOf` with a `null` branch that pipecat generates for an optional
argument, `str | None`); jsonschema is not a dependency, so anything beyond that is reported rather than
silently ignored.
"""

from __future__ import annotations

from typing import Any

TYPES = ("object", "string", "number", "integer", "boolean", "array", "null")
KEYWORDS = {
    "type", "description", "properties", "required", "enum", "items", "default", "title",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "format", "examples",
    "additionalProperties", "minItems", "maxItems", "anyOf", "oneOf",
}  # fmt: skip
ALTERNATIVES = ("anyOf", "oneOf")


def schema_problems(schema: Any, where: tuple = ()) -> list[tuple[tuple, str]]:
    """Every problem in a tool's parameters schema, as (path inside the schema, message)."""
    if not where:
        if not isinstance(schema, dict):
            return [((), "is not a mapping; expected a JSON schema with type: object")]
        if schema.get("type") != "object":
            return [(("type",), f"is {schema.get('type')!r}; expected 'object' (arguments are named)")]
    if not isinstance(schema, dict):
        return [(where, "is not a mapping; expected a JSON schema")]
    problems: list[tuple[tuple, str]] = []
    for key in schema:
        if key not in KEYWORDS:
            problems.append(((*where, key), "is not a JSON Schema keyword this loader understands"))
    alternatives = [k for k in ALTERNATIVES if k in schema]
    for key in alternatives:
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            problems.append(((*where, key), "expected a non-empty list of JSON schemas"))
            continue
        for i, branch in enumerate(branches):
            problems += schema_problems(branch, (*where, key, i))
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if kind is None and alternatives:
        return problems
    if kind is None:
        problems.append(((*where, "type"), f"missing; expected one of {', '.join(TYPES)}"))
    elif not all(isinstance(k, str) and k in TYPES for k in kinds):
        problems.append(
            ((*where, "type"), f"{kind!r} is not a JSON type; expected one of {', '.join(TYPES)}")
        )
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        problems.append(((*where, "enum"), "expected a non-empty list of allowed values"))
    if "object" in kinds:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            problems.append(((*where, "properties"), "expected a mapping of argument name to schema"))
            properties = {}
        for name, sub in properties.items():
            problems += schema_problems(sub, (*where, "properties", name))
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            problems.append(((*where, "required"), "expected a list of property names"))
        else:
            for name in required:
                if name not in properties:
                    problems.append(((*where, "required"), f"{name!r} is not one of the properties"))
    if "array" in kinds and "items" in schema:
        problems += schema_problems(schema["items"], (*where, "items"))
    return problems


def argument_problems(schema: dict, value: Any, where: str = "") -> list[str]:
    """Why `value` does not fit `schema` (types, required, enum); empty when it does."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    label = where or "arguments"
    for key in ALTERNATIVES:
        branches = [b for b in schema.get(key) or [] if isinstance(b, dict)]
        if branches and all(argument_problems(b, value, where) for b in branches):
            shown = " or ".join(_describe(b) for b in branches)
            return [f"{label} is {value!r}; expected {shown}"]
    if kinds and not any(_is(value, k) for k in kinds):
        return [f"{label} is {value!r}; expected {' or '.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{label} is {value!r}; expected one of {schema['enum']}"]
    problems: list[str] = []
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{where + '.' if where else ''}{name} is missing")
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                problems += argument_problems(sub, value[name], f"{where + '.' if where else ''}{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += argument_problems(schema["items"], item, f"{label}[{i}]")
    return problems


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            or (isinstance(value, float) and value.is_integer())
        )
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(
        value, {"object": dict, "string": str, "boolean": bool, "array": list, "null": type(None)}[kind]
    )


def _describe(schema: dict) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(map(str, kind))
    return str(kind) if kind else "a value of the schema"
