"""A row in the job's normal form, and what is wrong with one: the types every reader and encoder shares
(job/data/readers.py, formats.py, masks.py, preference.py), below all of them."""
from __future__ import annotations

from dataclasses import dataclass


class RowIssue(Exception):
    """A problem with one row: field + what is wrong (the caller adds FILE:LINE)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem

    def __reduce__(self):  # crosses to the tokenizer workers (a .json array's unreadable element)
        return RowIssue, (self.field, self.problem)


@dataclass
class Row:
    where: str  # FILE:LINE
    messages: list[dict]
    weight: float = 1.0
    tools: list[dict] | None = None  # function schemas the chat template renders (tool-use rows)


@dataclass
class BadRow:
    where: str
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.problem}"
