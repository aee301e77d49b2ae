"""The built-in tool environment: a calculator the model may call before it answers.

The model writes `CALC(<expression>)` in a turn to get the value back as an observation, and gives
its answer in a turn without a call; the task's own reward scores that answer. Expressions are
integers with + - * / and parentheses, evaluated from their syntax tree (no `eval`).
"""

from __future__ import annotations

import ast
import operator
import re

from parityrl.tasks.base import Problem, Task
from parityrl.tasks.environment import EnvReply, Message

INSTRUCTIONS = ("You have a calculator. To use it, write CALC(expression), for example "
                "CALC(12 + 7), and nothing else; its result comes back in the next message. "
                "When you know the answer, reply with just the number.")
CALL = re.compile(r"CALC\(([^()]*(?:\([^()]*\)[^()]*)*)\)")
MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 10**12  # bigger intermediate results are refused (no runaway products)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text, or an error message the model sees."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return "error: expression too long"
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        return f"error: {e.msg if isinstance(e, SyntaxError) else e}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand) * (-1 if isinstance(node.op, ast.USub) else 1)
    elif isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        value = _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    else:
        raise ValueError("only numbers, + - * / and parentheses")
    if abs(value) > MAX_ABS_VALUE:
        raise ValueError("number too large")
    return value


class CalculatorEnv:
    def __init__(self, task: Task, observation_role: str = "user") -> None:
        self.task = task
        self.observation_role = observation_role

    def start(self, problem: Problem) -> list[Message]:
        messages = [dict(m) for m in problem.messages or ({"role": "user",
                                                           "content": problem.prompt},)]
        if messages[0]["role"] == "system":
            messages[0]["content"] = INSTRUCTIONS + " " + messages[0]["content"]
        else:
            messages.insert(0, {"role": "system", "content": INSTRUCTIONS})
        return messages

    def respond(self, problem: Problem, messages: list[Message], last_turn: bool) -> EnvReply:
        said = messages[-1]["content"]
        call = CALL.search(said)
        if call is None or last_turn:
            return EnvReply(reward=float(self.task.reward(problem, said)))
        return EnvReply(message={"role": self.observation_role,
                                 "content": f"CALC result: {calculate(call.group(1))}"})
