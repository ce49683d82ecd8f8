"""`slm`: one command per workflow. Each workflow in `slmkit.workflows` is a command of its group
(`app.WorkflowGroup`), its options and help derived from the function's signature and docstring when the
command is first needed (`commands.workflow_command`); the commands that stream, serve or list are written by
hand in `generation.py` and `tools.py`. Heavy libraries load inside commands, which keeps `slm --help` fast."""

import sys

from slmkit.cli import generation, tools  # noqa: F401  (their commands register on import)
from slmkit.cli.app import app, err
from slmkit.errors import SlmError


def main() -> None:
    """Entry point: usage errors are click's (exit 2); slmkit's errors are one red line (exit 1)."""
    try:
        app()
    except SlmError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
