import io

from rich.console import Console

from slmkit.progress import Progress


def test_status_lines_in_a_log_and_none_on_a_terminal():
    log = io.StringIO()
    with Progress(console=Console(file=log, force_terminal=False, width=200), every=0.0) as bar:
        task = bar.add_task("sampling 2 program(s) for 3 problems", total=6, loss=0.5)
        for _ in range(6):
            bar.advance(task)
        bar.update(task, completed=6)  # finished: no second final line
    lines = [line for line in log.getvalue().splitlines() if "elapsed" in line]
    assert lines[0].startswith("sampling 2 program(s) for 3 problems: 2/6 (33%), 0:00 elapsed, ETA ")
    assert lines[0].endswith(", loss 0.5")
    assert lines[-1].startswith("sampling 2 program(s) for 3 problems: 6/6 (100%), 0:00 elapsed, loss 0.5")
    assert len(lines) == 5  # one per advance after the first, the last once

    log = io.StringIO()  # a field not measured yet (NaN, e.g. the loss before the first logged step) is left out
    with Progress(console=Console(file=log, force_terminal=False, width=200), every=0.0) as bar:
        task = bar.add_task("train", total=3, loss=float("nan"), tps=float("nan"))
        bar.advance(task)
        bar.advance(task)
        bar.update(task, loss=2.5, tps=100.0)
        bar.advance(task)
    lines = [line for line in log.getvalue().splitlines() if "elapsed" in line]
    assert "nan" not in lines[0] and "loss" not in lines[0] and "tps" not in lines[0]
    assert lines[-1].endswith(", loss 2.5, tps 100")

    quiet = io.StringIO()
    with Progress(console=Console(file=quiet, force_terminal=True, width=200), every=0.0) as bar:
        bar.advance(bar.add_task("train", total=2), 2)
    assert "elapsed" not in quiet.getvalue()  # a terminal shows the live bar instead

    with Progress(console=Console(file=io.StringIO(), force_terminal=False), disable=True) as bar:
        bar.advance(bar.add_task("x", total=1))


def test_field_columns_show_a_dash_until_measured():
    from slmkit.progress import FieldColumn

    loss, tps = FieldColumn("loss", "loss {:.4f}"), FieldColumn("tps", "{:,.0f} tok/s")
    with Progress(loss, tps, console=Console(file=io.StringIO()), disable=True) as bar:
        task = bar.add_task("train", total=3, loss=float("nan"), tps=float("nan"))
        assert (str(loss.render(bar.tasks[0])), str(tps.render(bar.tasks[0]))) == ("loss -", "- tok/s")
        bar.update(task, loss=2.5, tps=1234.4)
        assert (str(loss.render(bar.tasks[0])), str(tps.render(bar.tasks[0]))) == ("loss 2.5000", "1,234 tok/s")
