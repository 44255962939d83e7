"""Cutting one keyed value out of raw JSON bytes without parsing the rest.

A bounded window of a large body (its head and its tail) is not JSON any more, but the value of a
key inside it still is. In valid JSON the bytes ``"usage"`` followed by ``:`` can only be a key: a
quote inside a string is always escaped. So finding the key, then the balanced object after it,
gives exactly the object the full parse would have given.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_WHITESPACE = b" \t\r\n"
_TOKENS = re.compile(rb'\\.|["{}]', re.DOTALL)
MAX_OBJECT = 256 * 1024
"""Longest object cut out (usage objects are a few hundred bytes)."""
MAX_TRIES = 16
"""Occurrences of a key tried before giving up (each must be followed by an object)."""


def _value_start(buf: bytes | bytearray, after_key: int) -> int:
    """Index of the value after ``"key"`` at ``after_key``, or -1 if no ``:`` follows."""
    i = after_key
    n = len(buf)
    while i < n and buf[i] in _WHITESPACE:
        i += 1
    if i >= n or buf[i] != 0x3A:  # ":"
        return -1
    i += 1
    while i < n and buf[i] in _WHITESPACE:
        i += 1
    return i if i < n else -1


def followed_by_object(buf: bytes | bytearray, key: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether ``key`` occurs in ``buf[start:end]`` with an object as its value (``"usage":{``, not
    ``"usage":null`` as OpenAI sends in every chunk once usage is asked for)."""
    stop = len(buf) if end is None else end
    i = buf.find(key, start, stop)
    tries = 0
    while i >= 0 and tries < MAX_TRIES:
        j = _value_start(buf, i + len(key))
        if 0 <= j < stop and buf[j] == 0x7B:  # "{"
            return True
        i = buf.find(key, i + len(key), stop)
        tries += 1
    return False


def _object_end(buf: bytes | bytearray, start: int) -> int:
    """The index after the object starting at ``buf[start] == "{"``, or -1 if it does not close
    within ``MAX_OBJECT`` bytes."""
    depth = 0
    in_string = False
    for match in _TOKENS.finditer(buf, start, min(len(buf), start + MAX_OBJECT)):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string:
            continue
        elif token == b"{":
            depth += 1
        elif token == b"}":
            depth -= 1
            if depth == 0:
                return match.end()
    return -1


def _occurrences(buf: bytes | bytearray, key: bytes, last: bool) -> list[int]:
    found: list[int] = []
    if last:
        i = buf.rfind(key)
        while i >= 0 and len(found) < MAX_TRIES:
            found.append(i)
            i = buf.rfind(key, 0, i)
    else:
        i = buf.find(key)
        while i >= 0 and len(found) < MAX_TRIES:
            found.append(i)
            i = buf.find(key, i + 1)
    return found


def object_after(buf: bytes | bytearray, key: bytes, *, last: bool = True) -> dict[str, Any] | None:
    """The object value of the last (or first) occurrence of ``key`` that has one and parses."""
    for i in _occurrences(buf, key, last):
        j = _value_start(buf, i + len(key))
        if j < 0 or buf[j] != 0x7B:
            continue
        end = _object_end(buf, j)
        if end < 0:
            continue
        try:
            value = orjson.loads(bytes(buf[j:end]))
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def string_after(buf: bytes | bytearray, key: bytes, *, last: bool = False) -> str | None:
    """The string value of the first (or last) occurrence of ``key`` that has one."""
    for i in _occurrences(buf, key, last):
        j = _value_start(buf, i + len(key))
        if j < 0 or buf[j] != 0x22:  # '"'
            continue
        k = j + 1
        while True:
            k = buf.find(b'"', k, j + 1024)
            if k < 0:
                break
            backslashes = 0
            while buf[k - 1 - backslashes] == 0x5C:
                backslashes += 1
            if backslashes % 2 == 0:
                break
            k += 1
        if k < 0:
            continue
        try:
            value = orjson.loads(bytes(buf[j : k + 1]))
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, str) and value:
            return value
    return None
