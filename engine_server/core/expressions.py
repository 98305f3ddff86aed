"""Sandboxed expressions: splice values (`${expr}` inside text) and gateway conditions (boolrule syntax).

Nothing from a pipeline tree ever runs as Python code. A splice expression is parsed by `ast.parse` (parsing
only: no code object is compiled), checked against a whitelist of node types, functions and methods, and walked
by a small interpreter. A condition is parsed by a hand-written parser for the boolrule grammar bamboo uses.
Every evaluation is bounded (the MAX_* constants) and every failure, Python's own errors included, is an
ExpressionError whose message quotes the expression.

Splice expressions (`${...}`), Python-like:
    names (variables, via `lookup`), literals (int, float, 'str', "str", True/False/None and the reserved
    names true/false/null), `+ - * / // % **`, unary `- +`, comparisons (chained) `== != < <= > >= in not in`,
    `and or not`, `a if c else b`, indexing and slicing, list/tuple/dict literals, calls to FUNCTIONS, and
    calls of STR_METHODS / LIST_METHODS / DICT_METHODS on values of those types. Nothing else: no attribute
    access outside those method calls, no names starting with "__", no comprehensions, lambdas, f-strings,
    `:=`, `*x`, bytes, sets, `is`, bitwise operators, or `%` on strings.

Conditions (bamboo's boolrule), e.g. `${a} > 1 and not "${s}" in ("x", "y")`: see `compile_condition`.
"""

from __future__ import annotations

import ast
import io
import operator
import re
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, TypeAlias, TypeVar

__all__ = [
    "DICT_METHODS",
    "FUNCTIONS",
    "LIST_METHODS",
    "STR_METHODS",
    "Condition",
    "ExpressionError",
    "Lookup",
    "Splice",
    "compile_condition",
    "compile_splice",
    "render_value",
    "splice_names",
]

Lookup: TypeAlias = Callable[[str], Any]

# ---- Bounds -------------------------------------------------------------------------------------------------------
MAX_EXPRESSION_LENGTH: Final = 10_000  # characters in one ${...} expression, or in one condition
MAX_TEXT_LENGTH: Final = 1_000_000  # characters of a splice text that contains ${
MAX_SEGMENTS: Final = 1_000  # ${...} segments in one splice text
MAX_TOKENS: Final = 3_000  # Python tokens in one ${...} expression (checked before ast.parse)
MAX_NODES: Final = 1_000  # syntax tree nodes in one ${...} expression
MAX_DEPTH: Final = 50  # nesting: brackets and syntax tree depth; parentheses and `not` in conditions
MAX_INT_BITS: Final = 4_096  # size of any integer an expression computes
MAX_STRING_LENGTH: Final = 1_000_000  # characters of any string an expression computes, rendered text included
MAX_ITEMS: Final = 100_000  # items of any list, tuple or dict an expression computes
MAX_STEPS: Final = 100_000  # work per render/evaluate: one step per node, plus one per STEP_UNIT of bulk work
STEP_UNIT: Final = 1_024  # characters or items of bulk work that cost one step
MAX_VALUE_DEPTH: Final = 100  # nesting of lists/dicts that render_value and splice_names walk into
MAX_ROUND_DIGITS: Final = 1_000  # |ndigits| of round()

# ---- Whitelists ---------------------------------------------------------------------------------------------------
FUNCTIONS: Final = frozenset(
    [
        *("int", "str", "float", "bool", "len", "abs", "min", "max", "round", "sum", "sorted"),
        # String functions: upper(s), strip(s[, chars]), split(s[, sep[, maxsplit]]), join(sep, items),
        # replace(s, old, new[, count]); each is the method of the same name on its first argument.
        *("upper", "lower", "strip", "split", "join", "replace"),
    ]
)
_FUNCTION_KEYWORDS: Final[dict[str, frozenset[str]]] = {"sorted": frozenset(["reverse"])}

_STR_METHODS: Final[dict[str, Callable[..., Any]]] = {
    "split": str.split,
    "rsplit": str.rsplit,
    "upper": str.upper,
    "lower": str.lower,
    "strip": str.strip,
    "lstrip": str.lstrip,
    "rstrip": str.rstrip,
    "replace": str.replace,
    "join": str.join,
    "startswith": str.startswith,
    "endswith": str.endswith,
    "count": str.count,
    "find": str.find,
    "title": str.title,
    "capitalize": str.capitalize,
    "zfill": str.zfill,
    "isdigit": str.isdigit,
}
_LIST_METHODS: Final[dict[str, Callable[..., Any]]] = {"index": list.index, "count": list.count}
_TUPLE_METHODS: Final[dict[str, Callable[..., Any]]] = {"index": tuple.index, "count": tuple.count}
_DICT_METHODS: Final[dict[str, Callable[..., Any]]] = {
    "get": dict.get,
    "keys": lambda d: list(dict.keys(d)),
    "values": lambda d: list(dict.values(d)),
    "items": lambda d: list(dict.items(d)),
}
STR_METHODS: Final = frozenset(_STR_METHODS)
LIST_METHODS: Final = frozenset(_LIST_METHODS)
DICT_METHODS: Final = frozenset(_DICT_METHODS)
_ALL_METHODS: Final = STR_METHODS | LIST_METHODS | DICT_METHODS

_LITERAL_NAMES: Final[dict[str, Any]] = {"true": True, "false": False, "null": None}

_BINARY_OPERATORS: Final = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_UNARY_OPERATORS: Final = (ast.UAdd, ast.USub, ast.Not)
_COMPARE_OPERATORS: Final = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)
_OPERATOR_NODES: Final = (ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context)
_REFUSED: Final[dict[type[ast.AST], str]] = {
    ast.Lambda: "lambdas are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed",
    ast.NamedExpr: "assignment expressions (:=) are not allowed",
    ast.Starred: "starred expressions (*x) are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.FormattedValue: "f-strings are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
    ast.Set: "set literals are not allowed",
    ast.Attribute: "attribute access is not allowed (only whitelisted method calls such as s.upper())",
}
_MAX_INT_DIGITS: Final = MAX_INT_BITS * 3 // 10 + 1  # decimal digits of the largest allowed integer
_VALID_ESCAPES: Final = frozenset("\n\\'\"abfnrtv01234567xNuU")
_OPENING: Final = frozenset("([{")
_CLOSING: Final = frozenset(")]}")

_T = TypeVar("_T")


class ExpressionError(Exception):
    """An expression could not be compiled or evaluated. `expression` is the text concerned; `variable` names
    the variable when the problem is an undefined one."""

    def __init__(self, message: str, expression: str, variable: str | None = None) -> None:
        super().__init__(message, expression, variable)
        self.message = message
        self.expression = expression
        self.variable = variable

    def __str__(self) -> str:
        return f"{_quote(self.expression)}: {self.message}"


def _quote(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _LookupFailed(Exception):
    """Carries an exception raised by the caller's lookup (other than KeyError) past the evaluator's guard."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


# ---- Splice expressions: scanning and compiling -------------------------------------------------------------------


def _skip_string(text: str, start: int) -> int:
    """Index just past the Python string literal opened at `start`, or -1 if it is not closed."""
    quote = text[start] * 3 if text.startswith(text[start] * 3, start) else text[start]
    i = start + len(quote)
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
        elif text.startswith(quote, i):
            return i + len(quote)
        elif char == "\n" and len(quote) == 1:
            return -1
        else:
            i += 1
    return -1


def _find_close(text: str, start: int) -> int:
    """Index of the `}` closing a `${` whose expression starts at `start` (quotes and brackets inside the
    expression are skipped, as in `${d["}"]}`), or -1."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char in "'\"":
            i = _skip_string(text, i)
            if i < 0:
                return -1
            continue
        if char in "([{":
            depth += 1
        elif char in ")]":
            depth = max(depth - 1, 0)
        elif char == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return -1


@dataclass(frozen=True)
class _Expr:
    """One compiled ${...} expression."""

    source: str  # "${...}", for messages
    tree: ast.expr
    names: frozenset[str]


def _compile_expression(expression: str, segment: str, quoted: str) -> _Expr:
    """Compiles the text between `${` and `}`. Errors quote `quoted` (the segment, or a whole condition)."""

    def refuse(message: str) -> ExpressionError:
        return ExpressionError(message if segment == quoted else f"{segment}: {message}", quoted)

    stripped = expression.strip()
    if not stripped:
        raise refuse("empty expression")
    if len(stripped) > MAX_EXPRESSION_LENGTH:
        raise refuse(f"expression is longer than {MAX_EXPRESSION_LENGTH} characters (MAX_EXPRESSION_LENGTH)")
    problem = _check_tokens(stripped)
    if problem:
        raise refuse(problem)
    try:
        tree = ast.parse(stripped, mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise refuse(f"syntax error: {exc.msg}{where}") from None
    except (RecursionError, MemoryError):
        raise refuse(f"expression nested deeper than {MAX_DEPTH} levels (MAX_DEPTH)") from None
    except Exception as exc:  # ValueError and warnings turned into errors
        raise refuse(f"syntax error: {exc}") from None
    try:
        names = _validate(tree.body)
    except _Refused as exc:
        raise refuse(str(exc)) from None
    return _Expr(segment, tree.body, names)


def _check_tokens(expression: str) -> str | None:
    """Bounds the parser's input and refuses lexical forms before ast.parse sees them: too many tokens, brackets
    nested too deep, bytes and f-strings, and the two forms ast.parse would only warn about (an invalid escape
    sequence, a number glued to a word as in `1if`)."""
    count = depth = 0
    previous: tokenize.TokenInfo | None = None
    try:
        for token in tokenize.generate_tokens(io.StringIO(expression).readline):
            count += 1
            if count > MAX_TOKENS:
                return f"expression has more than {MAX_TOKENS} tokens (MAX_TOKENS)"
            kind = tokenize.tok_name.get(token.type, "")
            if kind.startswith("FSTRING"):
                return "f-strings are not allowed"
            if token.type == tokenize.OP and token.string in _OPENING:
                depth += 1
                if depth > MAX_DEPTH:
                    return f"brackets nested deeper than {MAX_DEPTH} levels (MAX_DEPTH)"
            elif token.type == tokenize.OP and token.string in _CLOSING:
                depth -= 1
            elif token.type == tokenize.NUMBER and len(token.string) > _MAX_INT_DIGITS + 2:
                return f"number literal over {MAX_INT_BITS} bits (MAX_INT_BITS)"
            elif token.type == tokenize.STRING:
                problem = _check_string_token(token.string)
                if problem:
                    return problem
            elif token.type == tokenize.ERRORTOKEN and not token.string.isspace():
                return f"syntax error: unexpected {token.string!r} at column {token.start[1] + 1}"
            elif (
                token.type == tokenize.NAME
                and previous
                and previous.type == tokenize.NUMBER
                and previous.end == token.start
            ):
                return f"syntax error: put a space between {previous.string!r} and {token.string!r}"
            previous = token
    except (tokenize.TokenError, SyntaxError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        return f"syntax error: {message}"
    return None


def _check_string_token(literal: str) -> str | None:
    prefix = literal[: min(i for i in (literal.find("'"), literal.find('"')) if i >= 0)].lower()
    if "b" in prefix:
        return "bytes literals are not allowed"
    if "f" in prefix:
        return "f-strings are not allowed"
    if "r" not in prefix:
        for match in re.finditer(r"\\(.)", literal, re.DOTALL):
            if match.group(1) not in _VALID_ESCAPES:
                return f"invalid escape sequence '\\{match.group(1)}'"
    return None


class _Refused(Exception):
    """A forbidden construct, found by _validate."""


def _validate(root: ast.expr) -> frozenset[str]:
    """Checks every node against the whitelist and the size limits; returns the variable names used."""
    names: set[str] = set()
    count = 0
    stack: list[tuple[ast.AST, int, ast.AST | None]] = [(root, 1, None)]
    while stack:
        node, depth, parent = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise _Refused(f"expression has more than {MAX_NODES} syntax nodes (MAX_NODES)")
        if depth > MAX_DEPTH:
            raise _Refused(f"expression nested deeper than {MAX_DEPTH} levels (MAX_DEPTH)")
        _validate_node(node, parent, names)
        children = [(child, depth + 1, node) for child in ast.iter_child_nodes(node)]
        stack.extend(item for item in children if not isinstance(item[0], _OPERATOR_NODES))
    return frozenset(names)


def _validate_node(node: ast.AST, parent: ast.AST | None, names: set[str]) -> None:
    is_callee = isinstance(parent, ast.Call) and parent.func is node
    if isinstance(node, ast.Constant):
        value = node.value
        if value is not None and type(value) not in (bool, int, float, str):
            raise _Refused(f"{type(value).__name__} literals are not allowed")
        if type(value) is int and value.bit_length() > MAX_INT_BITS:
            raise _Refused(f"integer literal over {MAX_INT_BITS} bits (MAX_INT_BITS)")
    elif isinstance(node, ast.Name):
        if node.id.startswith("__"):
            raise _Refused(f"names starting with '__' are not allowed: {node.id}")
        if is_callee:
            if node.id not in FUNCTIONS:
                raise _Refused(f"function {node.id} is not allowed (allowed: {', '.join(sorted(FUNCTIONS))})")
        elif node.id not in _LITERAL_NAMES:
            names.add(node.id)
    elif isinstance(node, ast.Attribute) and is_callee:
        if node.attr not in _ALL_METHODS:
            raise _Refused(f"method {node.attr} is not allowed")
    elif isinstance(node, ast.Call):
        _validate_call(node)
    elif isinstance(node, ast.BinOp):
        if not isinstance(node.op, _BINARY_OPERATORS):
            raise _Refused(f"operator {type(node.op).__name__} is not allowed")
        if isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
            raise _Refused("%-formatting of strings is not allowed")
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, _UNARY_OPERATORS):
            raise _Refused(f"operator {type(node.op).__name__} is not allowed")
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if not isinstance(op, _COMPARE_OPERATORS):
                raise _Refused("`is` comparisons are not allowed (use ==)")
    elif isinstance(node, ast.Slice):
        if not isinstance(parent, ast.Subscript):
            raise _Refused("extended slicing is not allowed")
    elif isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise _Refused("** unpacking is not allowed")
    elif isinstance(node, ast.keyword):
        pass  # checked with its call
    elif not isinstance(node, (ast.BoolOp, ast.IfExp, ast.Subscript, ast.List, ast.Tuple)):
        raise _Refused(_REFUSED.get(type(node), f"{type(node).__name__} expressions are not allowed"))


def _validate_call(node: ast.Call) -> None:
    if not isinstance(node.func, (ast.Name, ast.Attribute)):
        raise _Refused("only whitelisted functions and methods can be called")
    allowed = _FUNCTION_KEYWORDS.get(node.func.id, frozenset()) if isinstance(node.func, ast.Name) else None
    for keyword in node.keywords:
        if keyword.arg is None:
            raise _Refused("** unpacking is not allowed")
        if keyword.arg.startswith("_") or (allowed is not None and keyword.arg not in allowed):
            raise _Refused(f"keyword argument {keyword.arg} is not allowed here")


# ---- Evaluation ---------------------------------------------------------------------------------------------------


class _Budget:
    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps = 0


_NUMBER_TYPES: Final = (int, float)
_SEQUENCE_TYPES: Final = (str, list, tuple)
_SIZED_TYPES: Final = (str, list, tuple, dict)


class _Evaluator:
    """Walks validated trees. Every error it raises quotes `source`."""

    def __init__(self, lookup: Lookup, budget: _Budget, source: str) -> None:
        self.lookup = lookup
        self.budget = budget
        self.source = source

    # -- plumbing

    def fail(self, message: str, variable: str | None = None) -> ExpressionError:
        return ExpressionError(message if len(message) <= 500 else message[:500] + "...", self.source, variable)

    def guard(self, thunk: Callable[[], _T]) -> _T:
        """Runs `thunk`, turning any Python error into an ExpressionError; the lookup's own errors pass through."""
        try:
            return thunk()
        except ExpressionError:
            raise
        except _LookupFailed as failed:
            raise failed.error from None
        except ZeroDivisionError:
            raise self.fail("division by zero") from None
        except (RecursionError, MemoryError):
            raise self.fail("expression is too large to evaluate") from None
        except KeyError as exc:
            raise self.fail(f"key {_short(exc.args[0]) if exc.args else ''} not found") from None
        except Exception as exc:
            raise self.fail(str(exc) or type(exc).__name__) from None

    def charge(self, steps: int) -> None:
        self.budget.steps += steps
        if self.budget.steps > MAX_STEPS:
            raise self.fail(f"evaluation took more than {MAX_STEPS} steps (MAX_STEPS)")

    def charge_sizes(self, *values: Any) -> None:
        self.charge(sum(len(value) for value in values if isinstance(value, _SIZED_TYPES)) // STEP_UNIT)

    def check_size(self, sample: Any, size: int) -> None:
        """Refuses a str (or list/tuple/dict) result of `size` characters (items) before it is built."""
        if isinstance(sample, str):
            if size > MAX_STRING_LENGTH:
                raise self.fail(f"string result longer than {MAX_STRING_LENGTH} characters (MAX_STRING_LENGTH)")
        elif size > MAX_ITEMS:
            raise self.fail(f"{type(sample).__name__} result longer than {MAX_ITEMS} items (MAX_ITEMS)")

    def check_bits(self, bits: int) -> None:
        if bits > MAX_INT_BITS:
            raise self.fail(f"integer result over {MAX_INT_BITS} bits (MAX_INT_BITS)")

    def checked(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            self.check_bits(value.bit_length())
        elif isinstance(value, _SIZED_TYPES):
            self.check_size(value, len(value))
            self.charge(len(value) // STEP_UNIT)
        return value

    def variable(self, name: str) -> Any:
        try:
            return self.lookup(name)
        except KeyError:
            raise self.fail(f"variable {name} is not defined", variable=name) from None
        except Exception as exc:
            raise _LookupFailed(exc) from exc

    def text(self, value: Any) -> str:
        """str(value), as bamboo renders a value into text, refusing results over MAX_STRING_LENGTH."""
        if isinstance(value, str):
            return value
        if not isinstance(value, (bool, int, float)) and value is not None:
            self.check_size("", self.text_size(value))
        result = str(value)
        self.check_size(result, len(result))
        self.charge(len(result) // STEP_UNIT)
        return result

    def render_text(self, tree: ast.expr) -> str:
        return self.guard(lambda: self.text(self.eval(tree)))

    def text_size(self, value: Any) -> int:
        """A cheap estimate of len(str(value)) that stops once it passes MAX_STRING_LENGTH; shared references
        (`[s] * n`) count once per occurrence, as str() would print them."""
        size = visited = 0
        stack = [value]
        while stack and size <= MAX_STRING_LENGTH:
            item = stack.pop()
            visited += 1
            if visited % STEP_UNIT == 0:
                self.charge(1)
            if isinstance(item, str):
                size += len(item) + 2
            elif isinstance(item, (list, tuple)):
                size += 2 + 2 * len(item)
                if size <= MAX_STRING_LENGTH:
                    stack.extend(item)
            elif isinstance(item, dict):
                size += 2 + 4 * len(item)
                if size <= MAX_STRING_LENGTH:
                    stack.extend(item.keys())
                    stack.extend(item.values())
            elif isinstance(item, int) and not isinstance(item, bool):
                size += item.bit_length() // 3 + 2
            else:
                size += 24
        return size

    # -- expressions

    def eval(self, node: ast.expr) -> Any:
        self.charge(1)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return _LITERAL_NAMES[node.id] if node.id in _LITERAL_NAMES else self.variable(node.id)
        if isinstance(node, ast.BinOp):
            return self.binary(node.op, self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp):
            operand = self.eval(node.operand)
            if isinstance(node.op, ast.Not):
                return not operand
            return -operand if isinstance(node.op, ast.USub) else +operand
        if isinstance(node, ast.BoolOp):
            result: Any = None
            for value in node.values:
                result = self.eval(value)
                if bool(result) == isinstance(node.op, ast.Or):
                    return result
            return result
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        if isinstance(node, ast.Subscript):
            return self.subscript(node)
        if isinstance(node, ast.List):
            return self.checked([self.eval(item) for item in node.elts])
        if isinstance(node, ast.Tuple):
            return self.checked(tuple(self.eval(item) for item in node.elts))
        if isinstance(node, ast.Dict):
            pairs = zip(node.keys, node.values, strict=True)
            return self.checked({self.eval(key): self.eval(value) for key, value in pairs if key is not None})
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.fail(f"{type(node).__name__} is not allowed")

    def binary(self, op: ast.operator, left: Any, right: Any) -> Any:
        if isinstance(op, ast.Add):
            if isinstance(left, _SEQUENCE_TYPES) and isinstance(right, type(left)):
                self.check_size(left, len(left) + len(right))
            return self.checked(left + right)
        if isinstance(op, ast.Sub):
            return self.checked(left - right)
        if isinstance(op, ast.Mult):
            self.check_multiply(left, right)
            return self.checked(left * right)
        if isinstance(op, ast.Div):
            return left / right
        if isinstance(op, ast.FloorDiv):
            return self.checked(left // right)
        if isinstance(op, ast.Mod):
            if isinstance(left, (str, bytes)):
                raise self.fail("%-formatting of strings is not allowed")
            return self.checked(left % right)
        if isinstance(op, ast.Pow):
            # |left| ** right has at least right * (bits(left) - 1) + 1 bits: refuse before computing.
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                self.check_bits(right * (abs(left).bit_length() - 1) + 1)
            return self.checked(left**right)
        raise self.fail(f"operator {type(op).__name__} is not allowed")

    def check_multiply(self, left: Any, right: Any) -> None:
        if isinstance(left, int) and isinstance(right, int):
            self.check_bits(left.bit_length() + right.bit_length() - 1)
        elif isinstance(left, _SEQUENCE_TYPES) and isinstance(right, int):
            self.check_size(left, len(left) * max(right, 0))
        elif isinstance(right, _SEQUENCE_TYPES) and isinstance(left, int):
            self.check_size(right, len(right) * max(left, 0))

    def compare(self, node: ast.Compare) -> bool:
        left = self.eval(node.left)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.eval(comparator)
            self.charge_sizes(left, right)
            if not _PYTHON_COMPARISONS[type(op)](left, right):
                return False
            left = right
        return True

    def subscript(self, node: ast.Subscript) -> Any:
        container = self.eval(node.value)
        if not isinstance(container, _SIZED_TYPES):
            raise self.fail(f"a {type(container).__name__} value cannot be indexed")
        if isinstance(node.slice, ast.Slice):
            if isinstance(container, dict):
                raise self.fail("a dict cannot be sliced")
            bounds = [None if part is None else self.eval(part) for part in (node.slice.lower, node.slice.upper)]
            step = None if node.slice.step is None else self.eval(node.slice.step)
            for bound in (*bounds, step):
                if bound is not None and not isinstance(bound, int):
                    raise self.fail(f"slice bounds must be integers, not {type(bound).__name__}")
            return self.checked(container[bounds[0] : bounds[1] : step])
        key = self.eval(node.slice)
        if isinstance(container, dict):
            if key not in container:
                raise self.fail(f"key {_short(key)} not found")
            return container[key]
        if not isinstance(key, int):
            raise self.fail(f"{type(container).__name__} indices must be integers, not {type(key).__name__}")
        if not -len(container) <= key < len(container):
            raise self.fail(f"index {key} out of range (length {len(container)})")
        return container[key]

    def call(self, node: ast.Call) -> Any:
        receiver = self.eval(node.func.value) if isinstance(node.func, ast.Attribute) else None
        args = [self.eval(arg) for arg in node.args]
        kwargs = {keyword.arg: self.eval(keyword.value) for keyword in node.keywords if keyword.arg}
        self.charge_sizes(receiver, *args)
        if isinstance(node.func, ast.Attribute):
            return self.method(receiver, node.func.attr, args, kwargs)
        assert isinstance(node.func, ast.Name)  # ensured by _validate
        return self.checked(_FUNCTION_IMPLEMENTATIONS[node.func.id](self, args, kwargs))

    def method(self, receiver: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if isinstance(receiver, str):
            table = _STR_METHODS
        elif isinstance(receiver, list):
            table = _LIST_METHODS
        elif isinstance(receiver, tuple):
            table = _TUPLE_METHODS
        elif isinstance(receiver, dict):
            table = _DICT_METHODS
        else:
            table = {}
        if name not in table:
            raise self.fail(f"method {name} is not allowed on a {type(receiver).__name__} value")
        if isinstance(receiver, str):
            self.check_string_method(receiver, name, args, kwargs)
        return self.checked(table[name](receiver, *args, **kwargs))

    def check_string_method(self, text: str, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Refuses string methods whose result would pass the limits, before running them."""
        if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            old, new = args[0], args[1]
            limit = args[2] if len(args) > 2 else kwargs.get("count", -1)
            occurrences = len(text) + 1 if old == "" else text.count(old)
            if isinstance(limit, int) and limit >= 0:
                occurrences = min(occurrences, limit)
            self.check_size(text, len(text) + occurrences * (len(new) - len(old)))
        elif name == "zfill" and args and isinstance(args[0], int):
            self.check_size(text, args[0])
        elif name == "join" and args:
            items = args[0]
            if isinstance(items, str):
                total = len(items)
            elif isinstance(items, (list, tuple, dict)):
                total = sum(len(item) for item in items if isinstance(item, str))
            else:
                raise self.fail(f"join needs a list of strings, not {type(items).__name__}")
            self.check_size(text, total + len(text) * max(len(items) - 1, 0))
        elif name in ("split", "rsplit"):
            separator = args[0] if args else kwargs.get("sep")
            maxsplit = args[1] if len(args) > 1 else kwargs.get("maxsplit", -1)
            if isinstance(separator, str) and separator:
                pieces = text.count(separator) + 1
                if isinstance(maxsplit, int) and maxsplit >= 0:
                    pieces = min(pieces, maxsplit + 1)
                self.check_size([], pieces)

    # -- functions (FUNCTIONS)

    def arity(self, name: str, args: list[Any], low: int, high: int) -> None:
        if not low <= len(args) <= high:
            expected = str(low) if low == high else f"{low} to {high}"
            raise self.fail(f"{name}() takes {expected} arguments ({len(args)} given)")

    def string_argument(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{name}() needs a string, not {type(value).__name__}")
        return value

    def fn_int(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("int", args, 1, 2)
        value = args[0]
        if len(args) == 2:
            return int(self.string_argument("int", value), args[1])
        if not isinstance(value, (str, int, float)):
            raise self.fail(f"int() needs a number or a string, not {type(value).__name__}")
        return int(value)

    def fn_float(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("float", args, 1, 1)
        if not isinstance(args[0], (str, int, float)):
            raise self.fail(f"float() needs a number or a string, not {type(args[0]).__name__}")
        return float(args[0])

    def fn_str(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("str", args, 1, 1)
        return self.text(args[0])

    def fn_bool(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("bool", args, 1, 1)
        return bool(args[0])

    def fn_len(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("len", args, 1, 1)
        if not isinstance(args[0], _SIZED_TYPES):
            raise self.fail(f"len() needs a string, list or dict, not {type(args[0]).__name__}")
        return len(args[0])

    def fn_abs(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("abs", args, 1, 1)
        if not isinstance(args[0], _NUMBER_TYPES):
            raise self.fail(f"abs() needs a number, not {type(args[0]).__name__}")
        return abs(args[0])

    def fn_min(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("min", args, 1, MAX_ITEMS)
        return min(self.iterable("min", args[0])) if len(args) == 1 else min(args)

    def fn_max(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("max", args, 1, MAX_ITEMS)
        return max(self.iterable("max", args[0])) if len(args) == 1 else max(args)

    def fn_round(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("round", args, 1, 2)
        if not isinstance(args[0], _NUMBER_TYPES):
            raise self.fail(f"round() needs a number, not {type(args[0]).__name__}")
        if len(args) == 1:
            return round(args[0])
        digits = args[1]
        if not isinstance(digits, int) or abs(digits) > MAX_ROUND_DIGITS:
            raise self.fail(f"round() needs a number of digits between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}")
        return round(args[0], digits)

    def fn_sum(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("sum", args, 1, 1)
        items = self.iterable("sum", args[0])
        if not all(isinstance(item, _NUMBER_TYPES) for item in items):
            raise self.fail("sum() needs a list of numbers")
        return sum(items)

    def fn_sorted(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.arity("sorted", args, 1, 1)
        reverse = kwargs.get("reverse", False)
        if not isinstance(reverse, bool):
            raise self.fail("sorted() needs reverse=true or reverse=false")
        items = self.iterable("sorted", args[0])
        self.check_size([], len(items))
        return sorted(items, reverse=reverse)

    def iterable(self, name: str, value: Any) -> list[Any] | tuple[Any, ...] | str:
        if isinstance(value, dict):
            self.check_size([], len(value))
            return list(value)
        if not isinstance(value, _SEQUENCE_TYPES):
            raise self.fail(f"{name}() needs a list, tuple, dict or string, not {type(value).__name__}")
        return value

    def string_function(self, name: str, args: list[Any], low: int, high: int) -> Any:
        self.arity(name, args, low, high)
        return self.method(self.string_argument(name, args[0]), name, args[1:], {})

    def fn_upper(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self.string_function("upper", args, 1, 1)

    def fn_lower(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self.string_function("lower", args, 1, 1)

    def fn_strip(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self.string_function("strip", args, 1, 2)

    def fn_split(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self.string_function("split", args, 1, 3)

    def fn_replace(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        return self.string_function("replace", args, 3, 4)

    def fn_join(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """join(separator, items), like separator.join(items)."""
        return self.string_function("join", args, 2, 2)


_FUNCTION_IMPLEMENTATIONS: Final[dict[str, Callable[[_Evaluator, list[Any], dict[str, Any]], Any]]] = {
    name: getattr(_Evaluator, f"fn_{name}") for name in FUNCTIONS
}


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= 100 else text[:100] + "..."


_PYTHON_COMPARISONS: Final[dict[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda left, right: left in right,
    ast.NotIn: lambda left, right: left not in right,
}


# ---- Splice values ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splice:
    """A compiled splice value: text with `${expr}` segments."""

    text: str
    names: frozenset[str]
    _parts: tuple[str | _Expr, ...] = field(repr=False)

    def render(self, lookup: Lookup) -> Any:
        """Text that is exactly one `${expr}` gives the value itself (any type); otherwise each segment is
        replaced by str(value), as bamboo does. Text without `${` comes back unchanged.

        `lookup(name)` returns a variable's value and raises KeyError for an undefined one (an ExpressionError
        naming it follows); any other exception it raises passes through unchanged."""
        if len(self._parts) == 1 and isinstance(self._parts[0], _Expr):
            whole = self._parts[0]
            evaluator = _Evaluator(lookup, _Budget(), whole.source)
            return evaluator.guard(lambda: evaluator.eval(whole.tree))
        if all(isinstance(part, str) for part in self._parts):
            return self.text
        budget = _Budget()
        pieces: list[str] = []
        total = 0
        for part in self._parts:
            piece = part if isinstance(part, str) else _Evaluator(lookup, budget, part.source).render_text(part.tree)
            total += len(piece)
            if total > MAX_STRING_LENGTH:
                message = f"rendered text longer than {MAX_STRING_LENGTH} characters (MAX_STRING_LENGTH)"
                raise ExpressionError(message, self.text)
            pieces.append(piece)
        return "".join(pieces)


def compile_splice(text: str) -> Splice:
    """Parses every `${expr}` in `text`; an ExpressionError quoting the segment for a syntax error, a forbidden
    construct or a limit."""
    if "${" not in text:
        return Splice(text, frozenset(), (text,))
    if len(text) > MAX_TEXT_LENGTH:
        raise ExpressionError(f"text is longer than {MAX_TEXT_LENGTH} characters (MAX_TEXT_LENGTH)", text)
    parts: list[str | _Expr] = []
    names: set[str] = set()
    position = segments = 0
    while (begin := text.find("${", position)) >= 0:
        end = _find_close(text, begin + 2)
        if end < 0:
            raise ExpressionError("unterminated ${ (no matching })", text[begin:])
        segments += 1
        if segments > MAX_SEGMENTS:
            raise ExpressionError(f"text has more than {MAX_SEGMENTS} ${{...}} segments (MAX_SEGMENTS)", text)
        if begin > position:
            parts.append(text[position:begin])
        segment = text[begin : end + 1]
        expression = _compile_expression(text[begin + 2 : end], segment, segment)
        names |= expression.names
        parts.append(expression)
        position = end + 1
    if position < len(text):
        parts.append(text[position:])
    return Splice(text, frozenset(names), tuple(parts))


_cached_compile = lru_cache(maxsize=16_384)(compile_splice)
_CACHED_TEXT_LENGTH: Final = 4_096  # longer texts are compiled each time rather than kept in the cache


def cached_splice(text: str) -> Splice:
    """compile_splice, remembered by text: pipelines started from similar trees repeat the same inputs, and the
    compiled Splice is immutable."""
    return _cached_compile(text) if len(text) <= _CACHED_TEXT_LENGTH else compile_splice(text)


def render_value(value: Any, lookup: Lookup) -> Any:
    """Renders every string inside `value` (lists, tuples and dict values, not keys); other values unchanged."""
    return _render_value(value, lookup, 0)


def _render_value(value: Any, lookup: Lookup, depth: int) -> Any:
    if isinstance(value, str):
        return cached_splice(value).render(lookup) if "${" in value else value
    if not isinstance(value, (list, tuple, dict)):
        return value
    if depth >= MAX_VALUE_DEPTH:
        raise ExpressionError(f"value nested deeper than {MAX_VALUE_DEPTH} levels (MAX_VALUE_DEPTH)", _preview(value))
    if isinstance(value, dict):
        return {key: _render_value(item, lookup, depth + 1) for key, item in value.items()}
    rendered = [_render_value(item, lookup, depth + 1) for item in value]
    return rendered if isinstance(value, list) else tuple(rendered)


def splice_names(value: Any) -> frozenset[str]:
    """Every variable referenced by the strings inside `value` (as render_value walks it)."""
    names: set[str] = set()
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "${" in item:
                names |= cached_splice(item).names
            continue
        if not isinstance(item, (list, tuple, dict)):
            continue
        if depth >= MAX_VALUE_DEPTH:
            raise ExpressionError(
                f"value nested deeper than {MAX_VALUE_DEPTH} levels (MAX_VALUE_DEPTH)", _preview(item)
            )
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return frozenset(names)


def _preview(value: Any) -> str:
    return f"<{type(value).__name__} of {len(value)} items>" if isinstance(value, _SIZED_TYPES) else repr(value)


# ---- Conditions (boolrule) ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Literal:
    value: Any


@dataclass(frozen=True)
class _Path:
    """A bare name, optionally followed by dict keys: `a` or `a.b.c`."""

    parts: tuple[str, ...]


@dataclass(frozen=True)
class _Typed:
    """`${expr}` as an operand: the expression's value."""

    expression: _Expr


@dataclass(frozen=True)
class _Quoted:
    """A quoted string, with `${expr}` segments substituted as text."""

    parts: tuple[str | _Expr, ...]


@dataclass(frozen=True)
class _Sequence:
    """`(a, b)` or `[a, b]`."""

    items: tuple[_Operand, ...]


@dataclass(frozen=True)
class _Comparison:
    op: str
    left: _Operand
    right: _Operand


@dataclass(frozen=True)
class _Negation:
    inner: _Test


@dataclass(frozen=True)
class _Chain:
    """Comparisons joined by and/or, evaluated as boolrule does: left to right with no precedence between `and`
    and `or`, `x and REST` / `x or REST` (so `a and b or c` means `a and (b or c)`)."""

    first: _Test
    rest: tuple[tuple[str, _Test], ...]


_Operand: TypeAlias = "_Literal | _Path | _Typed | _Quoted | _Sequence"
_Test: TypeAlias = "_Comparison | _Negation | _Chain"

_CONDITION_OPERATORS: Final = frozenset(
    ["==", "!=", "<", ">", "<=", ">=", "in", "notin", "issuperset", "notissuperset"]
)
_CONDITION_KEYWORDS: Final = frozenset(["and", "or", "not", "true", "false", "none", "null"]) | _CONDITION_OPERATORS
_CONDITION_LITERALS: Final[dict[str, Any]] = {"true": True, "false": False, "none": None, "null": None}
_NUMBER: Final = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
_WORD: Final = re.compile(r"[^\W\d]\w*(?:\.[^\W\d]\w*)*")
_SYMBOL: Final = re.compile(r"==|!=|<=|>=|<|>|[()\[\],]")


@dataclass(frozen=True)
class _Token:
    kind: str  # "operand", "keyword", "symbol", "end"
    text: str
    position: int
    operand: _Operand | None = None


def _lex_condition(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
            continue
        if text.startswith("${", i):
            end = _find_close(text, i + 2)
            if end < 0:
                raise ExpressionError(f"unterminated ${{ at position {i + 1}", text)
            expression = _compile_expression(text[i + 2 : end], text[i : end + 1], text)
            tokens.append(_Token("operand", text[i : end + 1], i, _Typed(expression)))
            i = end + 1
        elif char in "'\"":
            i = _lex_quoted(text, i, tokens)
        elif number := _NUMBER.match(text, i):
            tokens.append(_Token("operand", number.group(), i, _Literal(_number(number.group(), text))))
            i = number.end()
        elif word := _WORD.match(text, i):
            lowered = word.group().lower()
            if lowered in _CONDITION_LITERALS:
                tokens.append(_Token("operand", word.group(), i, _Literal(_CONDITION_LITERALS[lowered])))
            elif lowered in _CONDITION_KEYWORDS:
                tokens.append(_Token("keyword", lowered, i))
            else:
                path = tuple(word.group().split("."))
                if any(part.startswith("__") for part in path):
                    raise ExpressionError(f"names starting with '__' are not allowed: {word.group()}", text)
                tokens.append(_Token("operand", word.group(), i, _Path(path)))
            i = word.end()
        elif symbol := _SYMBOL.match(text, i):
            kind = "keyword" if symbol.group() in _CONDITION_OPERATORS else "symbol"
            tokens.append(_Token(kind, symbol.group(), i))
            i = symbol.end()
        else:
            hint = " (use == to compare)" if char == "=" else ""
            raise ExpressionError(f"syntax error: unexpected {char!r} at position {i + 1}{hint}", text)
        if tokens and tokens[-1].kind == "operand" and i < len(text) and (text[i].isalnum() or text[i] == "_"):
            raise ExpressionError(f"syntax error: unexpected {text[i]!r} at position {i + 1}", text)
    tokens.append(_Token("end", "end of condition", len(text)))
    return tokens


def _lex_quoted(text: str, start: int, tokens: list[_Token]) -> int:
    """A quoted string (no escape sequences, as in boolrule: it ends at the next matching quote; `${...}` inside
    it is an expression, so quotes within that are its own)."""
    quote = text[start]
    parts: list[str | _Expr] = []
    i = literal_start = start + 1
    while True:
        if i >= len(text):
            raise ExpressionError(f"syntax error: unterminated string starting at position {start + 1}", text)
        if text[i] == quote:
            break
        if text.startswith("${", i):
            end = _find_close(text, i + 2)
            if end < 0:
                raise ExpressionError(f"unterminated ${{ at position {i + 1}", text)
            if i > literal_start:
                parts.append(text[literal_start:i])
            parts.append(_compile_expression(text[i + 2 : end], text[i : end + 1], text))
            i = literal_start = end + 1
        else:
            i += 1
    if i > literal_start:
        parts.append(text[literal_start:i])
    if all(isinstance(part, str) for part in parts):
        operand: _Operand = _Literal("".join(part for part in parts if isinstance(part, str)))
    else:
        operand = _Quoted(tuple(parts))
    tokens.append(_Token("operand", text[start : i + 1], start, operand))
    return i + 1


def _number(literal: str, condition: str) -> int | float:
    if any(char in literal for char in ".eE"):
        return float(literal)
    if len(literal.lstrip("+-")) > _MAX_INT_DIGITS:
        raise ExpressionError(f"integer literal over {MAX_INT_BITS} bits (MAX_INT_BITS)", condition)
    return int(literal)


class _ConditionParser:
    """condition := test (("and" | "or") test)*
    test      := "not" test | comparison | "(" condition ")"
    comparison:= operand OPERATOR operand
    operand   := number | string | true | false | none | null | name(.key)* | ${expr}
               | "(" scalar ("," scalar)* ")" | "[" [scalar ("," scalar)*] "]"
    """

    def __init__(self, text: str, tokens: list[_Token]) -> None:
        self.text = text
        self.tokens = tokens
        self.position = 0

    @property
    def current(self) -> _Token:
        return self.tokens[self.position]

    def error(self, expected: str) -> ExpressionError:
        token = self.current
        found = token.text if token.kind == "end" else repr(token.text)
        return ExpressionError(
            f"syntax error at position {token.position + 1}: expected {expected}, found {found}", self.text
        )

    def accept(self, kind: str, text: str | None = None) -> _Token | None:
        token = self.current
        if token.kind == kind and (text is None or token.text == text):
            self.position += 1
            return token
        return None

    def parse(self) -> _Test:
        result = self.chain(1)
        if self.current.kind != "end":
            raise self.error("'and', 'or' or the end of the condition")
        return result

    def chain(self, depth: int) -> _Test:
        first = self.test(depth)
        rest: list[tuple[str, _Test]] = []
        while (joiner := self.accept("keyword", "and") or self.accept("keyword", "or")) is not None:
            rest.append((joiner.text, self.test(depth)))
        return _Chain(first, tuple(rest)) if rest else first

    def test(self, depth: int) -> _Test:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"condition nested deeper than {MAX_DEPTH} levels (MAX_DEPTH)", self.text)
        if self.accept("keyword", "not"):
            return _Negation(self.test(depth + 1))
        if self.current.kind == "symbol" and self.current.text == "(":
            start = self.position
            operand = self.sequence(")")
            if operand is not None and self.current.kind == "keyword" and self.current.text in _CONDITION_OPERATORS:
                return self.comparison(operand)
            self.position = start + 1
            inner = self.chain(depth + 1)
            if not self.accept("symbol", ")"):
                raise self.error("')'")
            return inner
        return self.comparison(self.operand())

    def comparison(self, left: _Operand) -> _Test:
        operator = self.current
        if operator.kind != "keyword" or operator.text not in _CONDITION_OPERATORS:
            raise self.error(f"a comparison operator ({', '.join(sorted(_CONDITION_OPERATORS))})")
        self.position += 1
        return _Comparison(operator.text, left, self.operand())

    def operand(self) -> _Operand:
        token = self.current
        if token.kind == "operand" and token.operand is not None:
            self.position += 1
            return token.operand
        for opening, closing in (("(", ")"), ("[", "]")):
            if token.kind == "symbol" and token.text == opening:
                sequence = self.sequence(closing)
                if sequence is None:
                    raise self.error(f"a list of values ending with {closing!r}")
                return sequence
        raise self.error("a value")

    def sequence(self, closing: str) -> _Sequence | None:
        """`(a, b, ...)` or `[a, ...]` of plain values; None (and nothing consumed) if the tokens are not one."""
        start = self.position
        self.position += 1
        items: list[_Operand] = []
        if closing == "]" and self.accept("symbol", "]"):
            return _Sequence(())
        while True:
            token = self.current
            if token.kind != "operand" or token.operand is None:
                self.position = start
                return None
            items.append(token.operand)
            self.position += 1
            if self.accept("symbol", closing):
                return _Sequence(tuple(items))
            if not self.accept("symbol", ","):
                self.position = start
                return None


@dataclass(frozen=True)
class Condition:
    """A compiled gateway condition."""

    text: str
    names: frozenset[str]
    _root: _Test | None = field(repr=False)  # None: the match-all condition "*"

    def evaluate(self, lookup: Lookup) -> bool:
        """True when the condition holds. `lookup` as for Splice.render."""
        if self._root is None:
            return True
        evaluator = _Evaluator(lookup, _Budget(), self.text)
        root = self._root
        return evaluator.guard(lambda: _test(evaluator, root))


def compile_condition(text: str) -> Condition:
    """Parses a gateway condition in bamboo's boolrule grammar:

    - comparisons `== != < > <= >= in notin issuperset notissuperset` between two operands; a condition is
      comparisons joined by `and` / `or` (equal precedence, grouped to the right, as boolrule evaluates them),
      `not` before a comparison or a parenthesised group (an addition: boolrule has no `not`), and parentheses;
    - operands: numbers (`-1`, `2.5`, `1e3`), quoted strings ('...' or "...", no escape sequences),
      `true`/`false`/`none`/`null` (any case), `(a, b)` or `[a, b]` lists of those, `${expr}` (a splice
      expression's value), and bare names `a` or `a.b.c` (a variable, then dict keys);
    - `${expr}` inside a quoted string is substituted as text: `"${name}" == "bob"`;
    - keywords and operators are case-insensitive; `*` alone always holds.

    Values are compared as bamboo compares its rendered text: a string value of an unquoted operand that reads as
    a number or true/false is that number or boolean, and the comparison converts as boolrule does (see
    `_bamboo_operands`)."""
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(
            f"condition is longer than {MAX_EXPRESSION_LENGTH} characters (MAX_EXPRESSION_LENGTH)", text
        )
    if text.strip() == "*":
        return Condition(text, frozenset(), None)
    tokens = _lex_condition(text)
    if tokens[0].kind == "end":
        raise ExpressionError("empty condition", text)
    root = _ConditionParser(text, tokens).parse()
    names: set[str] = set()
    for token in tokens:
        names |= _operand_names(token.operand)
    return Condition(text, frozenset(names), root)


def _operand_names(operand: _Operand | None) -> frozenset[str]:
    if isinstance(operand, _Path):
        return frozenset([operand.parts[0]])
    if isinstance(operand, _Typed):
        return operand.expression.names
    if isinstance(operand, _Quoted):
        return frozenset(name for part in operand.parts if isinstance(part, _Expr) for name in part.names)
    return frozenset()


def _test(evaluator: _Evaluator, node: _Test) -> bool:
    if isinstance(node, _Chain):
        passed = _test(evaluator, node.first)
        for joiner, test in node.rest:
            if joiner == "or" and passed:
                return True
            if joiner == "and" and not passed:
                return False
            passed = _test(evaluator, test)
        return passed
    if isinstance(node, _Negation):
        return not _test(evaluator, node.inner)
    evaluator.charge(1)
    left, right = _bamboo_operands(
        evaluator, node.op, _operand_value(evaluator, node.left), _operand_value(evaluator, node.right)
    )
    evaluator.charge_sizes(left, right)
    op = node.op
    if op in ("issuperset", "notissuperset"):
        return set(left).issuperset(set(right)) == (op == "issuperset")
    if op in ("in", "notin"):
        return (left in right) == (op == "in")
    return bool(_CONDITION_COMPARISONS[op](left, right))


_CONDITION_COMPARISONS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _operand_value(evaluator: _Evaluator, operand: _Operand) -> Any:
    if isinstance(operand, _Literal):
        return operand.value
    if isinstance(operand, _Sequence):
        return [_operand_value(evaluator, item) for item in operand.items]
    if isinstance(operand, _Quoted):
        pieces = [
            part if isinstance(part, str) else evaluator.text(evaluator.eval(part.tree)) for part in operand.parts
        ]
        evaluator.check_size("", sum(len(piece) for piece in pieces))
        return "".join(pieces)
    if isinstance(operand, _Typed):
        return _as_literal(evaluator, evaluator.eval(operand.expression.tree))
    value = evaluator.variable(operand.parts[0])
    for index, key in enumerate(operand.parts[1:], start=1):
        if not isinstance(value, dict) or key not in value:
            raise evaluator.fail(f"{'.'.join(operand.parts[: index + 1])} is not defined")
        value = value[key]
    return _as_literal(evaluator, value)


_TEXT_NUMBER: Final = re.compile(r"\s*" + _NUMBER.pattern + r"\s*")


def _as_literal(evaluator: _Evaluator, value: Any) -> Any:
    """Bamboo pastes a value's text into the condition before parsing it, so an unquoted "12" compares as the
    number 12 and "true" as a boolean; a string value of an unquoted operand is read the same way."""
    if not isinstance(value, str):
        return value
    if _TEXT_NUMBER.fullmatch(value):
        return _number(value.strip(), evaluator.source)
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return value


def _bamboo_operands(evaluator: _Evaluator, op: str, left: Any, right: Any) -> tuple[Any, Any]:
    """The conversions boolrule applies before comparing (so that `"1" == 1` holds), except that a float is
    never truncated to an int (boolrule compares `2 == 2.5` as true)."""
    if op in ("in", "notin"):
        if isinstance(right, (list, tuple)) and right:
            extra: list[Any] = []
            if isinstance(left, int):
                extra = [number for number in map(_int_or_none, right) if number is not None]
            elif isinstance(left, str):
                extra = [evaluator.text(item) for item in right]
            right = [*right, *extra]
        return left, right
    if op in ("issuperset", "notissuperset"):
        return ([left] if isinstance(left, str) else left), ([right] if isinstance(right, str) else right)
    if isinstance(left, int) and isinstance(right, str):
        converted = _int_or_none(right)
        return (left, right) if converted is None else (left, converted)
    if isinstance(right, int) and isinstance(left, str):
        converted = _int_or_none(left)
        return (left, right) if converted is None else (converted, right)
    if isinstance(left, int) and not isinstance(right, float) and _int_or_none(right) is None:
        return left, right  # boolrule's int() failed: no further conversion
    if isinstance(right, int) and not isinstance(left, float) and _int_or_none(left) is None:
        return left, right
    if isinstance(left, str) and not isinstance(right, str):
        return left, evaluator.text(right)
    if isinstance(right, str) and not isinstance(left, str):
        return evaluator.text(left), right
    return left, right


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= _MAX_INT_DIGITS + 2:
        try:
            return int(value)
        except ValueError:
            return None
    return None


_cached_condition = lru_cache(maxsize=4_096)(compile_condition)


def cached_condition(text: str) -> Condition:
    """compile_condition, remembered by text (a Condition is immutable)."""
    return _cached_condition(text) if len(text) <= _CACHED_TEXT_LENGTH else compile_condition(text)
