"""The old daemon's Perl configuration files, read as data: no Perl is run.

The old daemon ran its configuration files as Perl. Its main file assigns
the whole hash, a site's override file single keys::

    %CONFIG = (
        # comment
        WAIT_MAXLEN => 1024 * 5,
        WAIT_ADDR => [ '0.0.0.0:8088', ],
        HOOK_CHECK_VISIBILITY => undef,
    );
    return 1;

    $CONFIG{WAIT_ADDR} = [ "0.0.0.0:80" ];

This module understands exactly that much: numbers, products of numbers
(``60 * 60``), single- or double-quoted strings, ``[lists]`` of those and
``undef``. Anything else (code, variables, concatenation, calls) is refused
with its line number, never guessed at.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Union

# None stands for undef.
Value = Union[int, float, str, list, None]

_TOKEN_RE = re.compile(r"""
      (?P<space>[ \t\r\f]+)
    | (?P<newline>\n)
    | (?P<comment>\#[^\n]*)
    | (?P<based>0[xXbB][0-9a-fA-F_]*)
    | (?P<number>(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)
    | (?P<var>[$%@][A-Za-z_]\w*)
    | (?P<word>[A-Za-z_]\w*)
    | (?P<op>=>|[=,;()\[\]{}*.+\-/])
    | (?P<quote>['"])
    | (?P<other>.)
""", re.VERBOSE)
_SINGLE_ESCAPES = {"\\": "\\", "'": "'"}
_DOUBLE_ESCAPES = {"\\": "\\", '"': '"', "$": "$", "@": "@", "'": "'", "n": "\n", "t": "\t", "r": "\r"}
_ARRAY_INTERPOLATION_RE = re.compile(r"@[\w{$:]")
_UNDERSTOOD = "numbers, products like 1024 * 5, quoted strings, [lists] and undef"


class PerlConfigError(ValueError):
    """Text this module does not understand, and the line it is on."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Setting:
    """One option of an old configuration: its name, value and where it was set."""

    name: str
    value: Value
    line: int
    source: str = ""


@dataclass(frozen=True)
class _Token:
    kind: str       # number, string, word, var, op or end
    text: str
    value: Value
    line: int

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the file"
        if self.kind == "string":
            return f"the string {self.text}"
        return f"`{self.text}`"


def read_settings(text: str, earlier: Mapping[str, Setting] | None = None,
                  source: str = "") -> dict[str, Setting]:
    """The settings once ``text`` has run over ``earlier``, by name.

    As in Perl, ``$CONFIG{NAME} = ...`` sets one name over what came before,
    and ``%CONFIG = (...)`` replaces everything before it. ``source`` names
    the file in each Setting. Raises PerlConfigError.
    """
    settings = dict(earlier or {})
    _Parser(text, source).run(settings)
    return settings


def _tokens(text: str) -> Iterator[_Token]:
    """The tokens of ``text``, one at a time, so the first thing refused is reported first."""
    line, pos = 1, 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        kind, token = match.lastgroup, match.group()
        pos = match.end()
        if kind == "newline":
            line += 1
        elif kind == "quote":
            value, pos = _string(text, pos, token, line)
            yield _Token("string", text[match.start():pos], value, line)
        elif kind == "number":
            yield _Token("number", token, _number(token, line), line)
        elif kind == "based":
            raise PerlConfigError(line, f"`{token}`: write numbers in decimal")
        elif kind == "other":
            raise PerlConfigError(line, f"unexpected character {token!r}; only {_UNDERSTOOD} are understood")
        elif kind not in ("space", "comment"):
            yield _Token(kind, token, None, line)
    yield _Token("end", "", None, line)


def _number(token: str, line: int) -> int | float:
    digits = token.replace("_", "")
    if re.match(r"0\d", digits):
        raise PerlConfigError(line, f"`{token}` is an octal number in Perl: write it in decimal")
    if any(c in digits for c in ".eE"):
        return float(digits)
    return int(digits)


def _string(text: str, pos: int, quote: str, line: int) -> tuple[str, int]:
    """The value of the string whose opening ``quote`` ends at ``pos``, and where it ends."""
    escapes = _SINGLE_ESCAPES if quote == "'" else _DOUBLE_ESCAPES
    out = []
    while True:
        if pos >= len(text) or text[pos] == "\n":
            raise PerlConfigError(line, "unterminated string: a string must end on the line it starts")
        char = text[pos]
        if char == quote:
            break
        if char == "\\" and pos + 1 < len(text) and text[pos + 1] != "\n":
            escaped = text[pos + 1]
            if escaped in escapes:
                out.append(escapes[escaped])
            elif quote == "'":
                out.append(char + escaped)
            else:
                raise PerlConfigError(line, f"the escape \\{escaped} in a double-quoted string is not understood")
            pos += 2
            continue
        if quote == '"' and (char == "$" or _ARRAY_INTERPOLATION_RE.match(text, pos)):
            raise PerlConfigError(line, f"a double-quoted string with {char} interpolates a Perl variable: "
                                        f"use single quotes, or write \\{char}")
        out.append(char)
        pos += 1
    value = "".join(out)
    if any("\udc80" <= c <= "\udcff" for c in value):
        raise PerlConfigError(line, "the string is not UTF-8 text")
    return value, pos + 1


class _Parser:
    """Statements ``%CONFIG = (...);``, ``$CONFIG{NAME} = ...;`` and a final ``return 1;``."""

    def __init__(self, text: str, source: str):
        self._tokens = _tokens(text)
        self._next: _Token | None = None
        self._source = source

    def peek(self) -> _Token:
        if self._next is None:
            self._next = next(self._tokens)
        return self._next

    def take(self) -> _Token:
        token = self.peek()
        self._next = None
        return token

    def expect(self, op: str, after: str) -> _Token:
        token = self.take()
        if token.kind != "op" or token.text != op:
            raise PerlConfigError(token.line, f"expected `{op}` {after}, found {token.describe()}")
        return token

    def run(self, settings: dict[str, Setting]) -> None:
        while (token := self.peek()).kind != "end":
            if token.kind == "var" and token.text == "%CONFIG":
                self._whole_hash(settings)
            elif token.kind == "var" and token.text == "$CONFIG":
                self._one_key(settings)
            elif token.kind == "word" and token.text == "return":
                self._return()
            elif (token.kind, token.text) == ("op", ";"):
                self.take()
            elif token.kind == "number":
                self.take()     # a bare `1;`, as Perl files often end
                self._end_of_statement()
            else:
                raise PerlConfigError(token.line, f"{token.describe()} where a statement should start; only "
                                                  "`%CONFIG = (...);` and `$CONFIG{NAME} = ...;` are understood")

    def _whole_hash(self, settings: dict[str, Setting]) -> None:
        opening = self.take()
        self.expect("=", "after %CONFIG")
        self.expect("(", "after %CONFIG =")
        settings.clear()
        while True:
            token = self.peek()
            if token.kind == "end":
                raise PerlConfigError(token.line, f"the file ends inside the %CONFIG list of line {opening.line}")
            if token.kind == "op" and token.text in (",", ")"):
                self.take()
                if token.text == ")":
                    break
                continue
            name = self._name()
            self.expect("=>", f"after {name.text}")
            value = self._value()
            settings[name.value] = Setting(name.value, value, name.line, self._source)
            after = self.peek()
            if after.kind != "op" or after.text not in (",", ")"):
                raise PerlConfigError(after.line, f"expected `,` or `)` after the value of {name.value}, "
                                                  f"found {after.describe()}")
        self._end_of_statement()

    def _one_key(self, settings: dict[str, Setting]) -> None:
        self.take()
        self.expect("{", "after $CONFIG")
        name = self._name()
        self.expect("}", f"after $CONFIG{{{name.value}")
        self.expect("=", f"after $CONFIG{{{name.value}}}")
        value = self._value()
        settings[name.value] = Setting(name.value, value, name.line, self._source)
        self._end_of_statement()

    def _return(self) -> None:
        self.take()
        if (self.peek().kind, self.peek().text) not in (("op", ";"), ("end", "")):
            self._value()
        self._end_of_statement()
        token = self.peek()
        if token.kind != "end":
            raise PerlConfigError(token.line, f"{token.describe()} after `return`: Perl would never read it")

    def _end_of_statement(self) -> None:
        token = self.peek()
        if token.kind == "end":
            return
        self.expect(";", "at the end of the statement")

    def _name(self) -> _Token:
        """An option name: a bareword or a quoted string (its value is the name)."""
        token = self.take()
        if token.kind == "word":
            return _Token("name", token.text, token.text, token.line)
        if token.kind == "string":
            return _Token("name", token.text, token.value, token.line)
        raise PerlConfigError(token.line, f"expected an option name, found {token.describe()}")

    def _value(self) -> Value:
        token = self.take()
        if token.kind == "number" or (token.kind, token.text) == ("op", "-"):
            value = self._product(token)
        elif token.kind == "string":
            value = token.value
        elif (token.kind, token.text) == ("op", "["):
            value = self._list(token)
        elif (token.kind, token.text) == ("word", "undef") and self.peek().text != "(":
            value = None
        else:
            raise self._not_a_value(token)
        self._refuse_operator(value)
        return value

    def _product(self, first: _Token) -> int | float:
        value = self._signed_number(first)
        while (self.peek().kind, self.peek().text) == ("op", "*"):
            self.take()
            value *= self._signed_number(self.take())
        return value

    def _signed_number(self, token: _Token) -> int | float:
        if (token.kind, token.text) == ("op", "-"):
            return -self._signed_number(self.take())
        if token.kind != "number":
            raise PerlConfigError(token.line, f"only numbers can be multiplied, not {token.describe()}")
        return token.value

    def _list(self, opening: _Token) -> list:
        items: list = []
        while True:
            token = self.peek()
            if token.kind == "end":
                raise PerlConfigError(token.line, f"the file ends inside the list opened on line {opening.line}")
            if token.kind == "op" and token.text in (",", "]"):
                self.take()
                if token.text == "]":
                    return items
                continue
            item = self._value()
            if item is None or isinstance(item, list):
                raise PerlConfigError(token.line, "a list may hold numbers and strings only, "
                                                  "not undef or another list")
            items.append(item)
            after = self.peek()
            if after.kind != "op" or after.text not in (",", "]"):
                raise PerlConfigError(after.line, f"expected `,` or `]` in the list, found {after.describe()}")

    def _refuse_operator(self, value: Value) -> None:
        token = self.peek()
        if token.kind != "op":
            return
        if token.text == ".":
            raise PerlConfigError(token.line, "string concatenation (`.`) is not understood: write the whole value")
        if token.text in "+-/":
            raise PerlConfigError(token.line, f"`{token.text}` is not understood: only `*` between numbers is; "
                                              "write the result")
        if token.text == "*":
            raise PerlConfigError(token.line, f"only numbers can be multiplied, not {value!r}")

    def _not_a_value(self, token: _Token) -> PerlConfigError:
        if token.kind == "word" and token.text == "sub":
            message = "`sub` is Perl code, which is never run or converted (this server has no hooks)"
        elif token.kind == "word" and self.peek().text in ("(", "{"):
            brackets = "()" if self.peek().text == "(" else "{}"
            message = f"`{token.text}{brackets[0]}...{brackets[1]}` is Perl code, not a value"
        elif token.kind == "word":
            message = f"the bareword `{token.text}` is not a value: put strings in quotes"
        elif token.kind == "var":
            message = f"the variable `{token.text}` is not understood: write the value itself"
        elif token.kind == "end":
            message = "the file ends where a value should be"
        else:
            message = f"{token.describe()} where a value should be"
        return PerlConfigError(token.line, f"{message}; only {_UNDERSTOOD} are understood")
