"""The pass/fail table, written row by row as cases finish, and the failures after it."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Final, TextIO

from .runner import Result
from .table import Group

__all__ = ["Report"]

NOTE_WIDTH: Final = 90
TRANSCRIPT_SHOWN: Final = 25


class Report:
    """Writes to ``out`` (the kit's stdout)."""

    def __init__(self, out: TextIO, groups: Sequence[Group]) -> None:
        self.out = out
        names = [(g.name, c.name) for g in groups for c in g.cases]
        self.group_width = max([len("GROUP"), *(len(g) for g, _ in names)])
        self.case_width = max([len("CASE"), *(len(c) for _, c in names)])
        self._last_group = ""

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def header(
        self, command: Sequence[str], *, schema: str, model: str | None, model_note: str
    ) -> None:
        model_line = f"{model} ({model_note})" if model else f"NONE: {model_note}"
        self._write(
            "mlx-bridge protocol conformance kit\n"
            f"  worker: {shlex.join(command)}\n"
            f"  checks: {schema}\n"
            f"  model:  {model_line}\n\n"
            f"{'GROUP':<{self.group_width}}  {'CASE':<{self.case_width}}  RESULT    TIME  NOTE\n"
        )

    def row(self, result: Result) -> None:
        group = result.group if result.group != self._last_group else ""
        self._last_group = result.group
        note = result.note.strip().splitlines()[0] if result.note.strip() else ""
        if len(note) > NOTE_WIDTH:
            note = note[: NOTE_WIDTH - 3] + "..."
        self._write(
            f"{group:<{self.group_width}}  {result.case:<{self.case_width}}  "
            f"{result.status:<6} {result.seconds:6.2f}s  {note}\n"
        )

    def summary(self, results: Sequence[Result], seconds: float) -> None:
        counts = {
            status: sum(r.status == status for r in results) for status in ("PASS", "FAIL", "SKIP")
        }
        self._write(
            f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
            f" in {seconds:.1f} s\n"
        )
        for result in results:
            if result.status == "FAIL":
                self._failure(result)
        if counts["SKIP"]:
            reasons = sorted({r.note for r in results if r.status == "SKIP"})
            self._write("\nSKIPPED:\n" + "".join(f"  {reason}\n" for reason in reasons))

    def _failure(self, result: Result) -> None:
        lines = [f"\n=== FAIL {result.group} / {result.case}", result.note.rstrip()]
        if result.transcript:
            lines.append(
                f"--- last {min(len(result.transcript), TRANSCRIPT_SHOWN)} lines on the wire:"
            )
            lines.extend(f"  {entry}" for entry in result.transcript[-TRANSCRIPT_SHOWN:])
        if result.stderr_tail.strip():
            lines.append("--- worker stderr (tail):")
            lines.extend(f"  {line}" for line in result.stderr_tail.rstrip().splitlines()[-30:])
        self._write("\n".join(lines) + "\n")
