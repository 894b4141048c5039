"""
One YAML mapping of the configuration, read key by key, and the error that
names the file, line and key of a wrong value.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterator

import yaml

_REQUIRED: Any = object()

# What str.splitlines breaks a line at.
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


class ConfigError(Exception):
    """
    The configuration is wrong; the message names the file, line, key and
    problem, on one line: a line break in it (from a value, or from the text
    of an error that a library raised about one) is written as its escape.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_LINE_BREAKS.sub(lambda m: repr(m[0])[1:-1], message))


class Section:
    """
    One YAML mapping of the configuration, read key by key.

    Each accessor checks the value's type and range and raises a
    L{ConfigError} that names the key's full path and line. Stash types read
    their own options through one of these, so that their errors read the same.
    """

    def __init__(self, node: yaml.Node | None, path: str, source: str, line: int) -> None:
        self.path = path
        self.source = source
        self.line = line
        self._nodes: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self._used: set[str] = set()
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return
        if not isinstance(node, yaml.MappingNode):
            raise self._fail(node, path, "must be a mapping of keys to values")
        for keyNode, valueNode in node.value:
            key = _construct(keyNode)
            if not isinstance(key, str):
                raise self._fail(keyNode, path, f"key {key!r} must be a string")
            if key in self._nodes:
                raise self._fail(keyNode, self._join(key), "appears twice")
            self._nodes[key] = (keyNode, valueNode)

    def _join(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _fail(self, node: yaml.Node, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}:{node.start_mark.line + 1}: {path}: {problem}")

    def error(self, key: str, problem: str) -> ConfigError:
        """
        An error about C{key}, placed on its line (or on the section's when
        the key is missing).
        """
        if key in self._nodes:
            return self._fail(self._nodes[key][1], self._join(key), problem)
        return ConfigError(f"{self.source}:{self.line}: {self._join(key)}: {problem}")

    def _unknown(self, key: str, hint: str) -> ConfigError:
        return self._fail(self._nodes[key][0], self._join(key), f"unknown key ({hint})")

    def __contains__(self, key: str) -> bool:
        return key in self._nodes

    def values(self) -> dict[str, Any]:
        """
        Every key and its value, as YAML gives them (nothing is checked).
        """
        return {key: _construct(value) for key, (_, value) in self._nodes.items()}

    def keys(self) -> list[str]:
        """
        The keys, in file order.
        """
        return list(self._nodes)

    def _take(self, key: str, default: Any) -> Any:
        self._used.add(key)
        if key not in self._nodes:
            if default is _REQUIRED:
                self._rejectMisspelling(key)
                raise self.error(key, "is required")
            return default
        return _construct(self._nodes[key][1])

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        """
        A non-empty string (or C{default}, which may be L{None}, when absent
        or null).
        """
        value = self._take(key, default)
        if value is None and default is not _REQUIRED:
            return default
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, not {value!r}")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 0) -> int:
        """
        A whole number no smaller than C{minimum}.
        """
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be a whole number >= {minimum}, not {value!r}")
        return value

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool:
        """
        C{true} or C{false}.
        """
        value = self._take(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def number(self, key: str, default: Any = _REQUIRED, minimum: float = 0.0) -> float:
        """
        A number greater than C{minimum}.
        """
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > minimum:
            raise self.error(key, f"must be a number > {minimum:g}, not {value!r}")
        return float(value)

    def strings(self, key: str, default: Any = _REQUIRED) -> list[str]:
        """
        A list of non-empty strings, without repeats.
        """
        value = self._take(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"must be a list of names, not {value!r}")
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise self.error(key, f"names {', '.join(repeated)} more than once")
        return value

    def section(self, key: str) -> Section:
        """
        The nested mapping under C{key}; an empty one when absent or null.
        """
        self._used.add(key)
        if key not in self._nodes:
            return Section(None, self._join(key), self.source, self.line)
        keyNode, valueNode = self._nodes[key]
        return Section(valueNode, self._join(key), self.source, keyNode.start_mark.line + 1)

    def sequence(self, key: str) -> Iterator[Section]:
        """
        The mappings of the list under C{key}, each as a section.
        """
        self._used.add(key)
        if key not in self._nodes:
            raise self.error(key, "is required")
        node = self._nodes[key][1]
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(key, "must be a non-empty list")
        for index, item in enumerate(node.value):
            yield Section(item, f"{self._join(key)}[{index}]", self.source, item.start_mark.line + 1)

    def _rejectMisspelling(self, key: str) -> None:
        """
        Before saying that C{key} is missing, fail on a key that no accessor
        asked for and that looks like it (C{rootes} for C{routes}).
        """
        unknown = [k for k in self._nodes if k not in self._used]
        for near in difflib.get_close_matches(key, unknown, n=1, cutoff=0.6):
            raise self._unknown(near, f"did you mean {key!r}?")

    def expect(self, *keys: str) -> None:
        """
        Fail on the first key that is not one of C{keys}, before reading
        any: for a section whose keys are all known up front.
        """
        for key in self._nodes:
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}?" if near else f"known here: {', '.join(sorted(keys))}"
                raise self._unknown(key, hint)

    def rejectUnknown(self) -> None:
        """
        Fail on the first key that no accessor asked for: most often a typo.
        """
        for key in self._nodes:
            if key not in self._used:
                known = ", ".join(sorted(self._used)) or "none"
                raise self._unknown(key, f"known here: {known}")


def _construct(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)
