"""Built-in text tool ``calculator``: a safe arithmetic evaluator on Python's ``ast``.

The expression is parsed with ``ast.parse(mode="eval")`` (parsing neither runs nor constant-folds
anything) and the tree is walked by :func:`evaluate`, which knows only:

* numbers: ``int`` and ``float`` literals (not ``bool``, ``complex``, strings, bytes);
* binary ``+ - * / // % **``, unary ``+ -``, parentheses;
* the names ``pi``, ``e`` and the calls ``sqrt, exp, log, log10, log2, sin, cos, tan, asin,
  acos, atan, abs, round, floor, ceil, min, max`` (positional arguments only).

Anything else (attributes, subscripts, other names, comprehensions, lambdas, strings:
``__import__('os')``, ``'a' * 10**9``) is refused before anything is evaluated. Size bounds keep
every step cheap: the expression has at most ``max_chars`` characters and ``max_nodes`` nodes;
``a ** b`` is refused unless ``|b| <= max_exponent`` and ``|b| * log10|a| <= max_digits`` (so
``2 ** 10 ** 10`` is refused before the inner power is even computed: its exponent exceeds the
bound); every intermediate result must satisfy ``|x| <= 10 ** max_digits``. A refusal, a
division by zero or a domain error (``sqrt(-1)``) is a :class:`ToolArgumentError`, which the model
reads as an error message.

Results: an exact integer prints as an integer (``7 / 7`` -> ``1``); a float with 12
significant digits (``1 / 3`` -> ``0.333333333333``).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from framework.registry import TOOLS

from .base import Tool, ToolArgumentError, ToolContext, ToolResult

_BINARY: dict[type, Callable] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_FUNCTIONS: dict[str, tuple[Callable, int, int]] = {  # name: (function, min args, max args)
    "sqrt": (math.sqrt, 1, 1),
    "exp": (math.exp, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "log2": (math.log2, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
    "asin": (math.asin, 1, 1),
    "acos": (math.acos, 1, 1),
    "atan": (math.atan, 1, 1),
    "abs": (abs, 1, 1),
    "round": (round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "min": (min, 1, 16),
    "max": (max, 1, 16),
}


def evaluate(
    expression: str, *, max_chars: int = 200, max_nodes: int = 100, max_exponent: int = 1000, max_digits: int = 100
):
    """The value of ``expression`` (an int or a finite float); ToolArgumentError when it is not
    an expression this evaluator accepts or its value breaks a bound (see the module doc)."""
    if not isinstance(expression, str):
        raise ToolArgumentError("expression must be a string")
    if len(expression) > max_chars:
        raise ToolArgumentError(f"expression is longer than {max_chars} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # deep nesting: RecursionError
        raise ToolArgumentError(f"not an arithmetic expression ({type(e).__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > max_nodes:
        raise ToolArgumentError(f"expression has more than {max_nodes} parts")
    try:
        return _Evaluator(max_exponent, max_digits).walk(tree)
    except OverflowError:  # float ** float, float * float past the float range
        raise ToolArgumentError("result is too large") from None
    except RecursionError:
        raise ToolArgumentError("expression is nested too deeply") from None


class _Evaluator:
    """Walks an ``ast.Expression`` of the accepted grammar; every intermediate result bounded."""

    def __init__(self, max_exponent: int, max_digits: int):
        self.max_exponent, self.max_digits = max_exponent, max_digits
        self.limit = 10**max_digits

    def check(self, x):
        # every intermediate result bounded: no step can build a huge integer or float
        if isinstance(x, float) and not math.isfinite(x):
            raise ToolArgumentError("result is not finite")
        if abs(x) > self.limit:
            raise ToolArgumentError(f"result exceeds 10**{self.max_digits}")
        return x

    def power(self, a, b):
        if abs(b) > self.max_exponent:
            raise ToolArgumentError(f"exponent {b} exceeds {self.max_exponent}")
        # log10 |a^b| = b * log10 |a|: refuse before computing a result that breaks the bound
        if a != 0 and abs(b) * math.log10(abs(a)) > self.max_digits:
            raise ToolArgumentError(f"result exceeds 10**{self.max_digits}")
        if a == 0 and b < 0:
            raise ToolArgumentError("division by zero")
        r = a**b
        if isinstance(r, complex):  # (-8) ** (1/3)
            raise ToolArgumentError("result is not a real number")
        return r

    def walk(self, node):
        if isinstance(node, ast.Expression):
            return self.walk(node.body)
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):  # bool is an int; strings are refused
                raise ToolArgumentError(f"only numbers are allowed, got {type(v).__name__}")
            return self.check(v)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self.binary(node)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return self.check(_UNARY[type(node.op)](self.walk(node.operand)))
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return self.call(node)
        what = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else type(node).__name__
        raise ToolArgumentError(f"'{what}' is not allowed (numbers, + - * / // % **, parentheses and math functions)")

    def binary(self, node: ast.BinOp):
        a, b = self.walk(node.left), self.walk(node.right)
        if isinstance(node.op, ast.Pow):
            return self.check(self.power(a, b))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise ToolArgumentError("division by zero")
        return self.check(_BINARY[type(node.op)](a, b))

    def call(self, node: ast.Call):
        fn, lo, hi = _FUNCTIONS[node.func.id]
        if node.keywords or not lo <= len(node.args) <= hi:
            raise ToolArgumentError(f"{node.func.id} takes {lo}..{hi} positional arguments")
        args = [self.walk(a) for a in node.args]
        if node.func.id == "round" and len(args) == 2 and (not isinstance(args[1], int) or abs(args[1]) > 100):
            raise ToolArgumentError("round(x, n) needs an integer n with |n| <= 100")
        try:
            return self.check(fn(*args))
        except (ValueError, OverflowError, TypeError) as e:  # sqrt(-1), exp(1000), floor(inf)
            raise ToolArgumentError(f"{node.func.id}: {e}") from None


def format_number(x) -> str:
    """An exact integer as an integer, a float with 12 significant digits."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    if isinstance(x, float):
        return format(x, ".12g")
    return str(x)


@TOOLS.register("calculator")
class CalculatorTool(Tool):
    description = (
        "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, pi, e and "
        "sqrt, exp, log, log10, log2, sin, cos, tan, asin, acos, atan, abs, round, floor, ceil, min, max."
    )
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "For example: (3 + 4) * 2 / 7"}},
        "required": ["expression"],
        "additionalProperties": False,
    }

    def __init__(self, max_chars: int = 200, max_nodes: int = 100, max_exponent: int = 1000, max_digits: int = 100):
        self.bounds = dict(max_chars=max_chars, max_nodes=max_nodes, max_exponent=max_exponent, max_digits=max_digits)

    def run(self, arguments: dict, context: ToolContext) -> ToolResult:
        return ToolResult(text=format_number(evaluate(arguments["expression"], **self.bounds)))


__all__ = ["CalculatorTool", "evaluate", "format_number"]
