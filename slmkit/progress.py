"""Progress bars that also report in log files.

On a terminal this is Rich's live progress bar. Where output is not a terminal (`nohup slm ... > log`, CI, a
job scheduler) Rich draws nothing until the end, so a long run looks dead; there each task prints a plain status
line (`sampling 8 program(s) for 200 problems: 96/1600 (6%), 4:10 elapsed, ETA 1:05:20`) at most every
`every` seconds, and once when it finishes.
"""

from __future__ import annotations

import math
import re
import time

from rich.progress import Progress as RichProgress
from rich.progress import ProgressColumn
from rich.text import Text


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _measured(value) -> bool:
    """A number that is not NaN (NaN: nothing measured yet, e.g. the loss before the first logged step)."""
    return isinstance(value, float | int) and not math.isnan(value)


class FieldColumn(ProgressColumn):
    """A task field formatted with `template` (e.g. "loss {:.4f}"); "-" in its place until it is measured (NaN)."""

    def __init__(self, name: str, template: str):
        super().__init__()
        self.name, self.template = name, template

    def render(self, task) -> Text:
        value = task.fields.get(self.name, math.nan)
        return Text(self.template.format(value) if _measured(value) else re.sub(r"\{[^}]*\}", "-", self.template))


class Progress(RichProgress):
    """`rich.progress.Progress` with status lines where the console is not a terminal."""

    def __init__(self, *columns, every: float = 30.0, **kwargs):
        super().__init__(*columns, **kwargs)
        self.every = every
        self._last_line: dict = {}

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def _report(self, task_id) -> None:
        if self.disable or self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        last = self._last_line.get(task_id)
        if last == "done" or (not task.finished and last is not None and now - last < self.every):
            return
        if last is None and not task.finished:  # the first line after `every` seconds, not at the start
            self._last_line[task_id] = now
            return
        self._last_line[task_id] = "done" if task.finished else now
        total = f"/{task.total:,.0f} ({task.percentage:.0f}%)" if task.total else ""
        eta = "" if task.finished else f", ETA {_clock(task.time_remaining)}"
        fields = "".join(f", {k} {v:.4g}" for k, v in task.fields.items() if _measured(v))
        self.console.print(f"{task.description}: {task.completed:,.0f}{total}, {_clock(task.elapsed)} elapsed{eta}"
                           f"{fields}", markup=False, highlight=False)
