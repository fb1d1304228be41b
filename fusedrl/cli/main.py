"""``fusedrl`` command line (typer): the command group and its dispatch.

One module per command (:mod:`~fusedrl.cli.train`, :mod:`~fusedrl.cli.plan`,
:mod:`~fusedrl.cli.simulate`, :mod:`~fusedrl.cli.schedule`, :mod:`~fusedrl.cli.realloc`,
:mod:`~fusedrl.cli.bench`), the shared helpers in :mod:`fusedrl.cli.common`. Bad input
exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import sys

import typer

from fusedrl.cli.bench import bench
from fusedrl.cli.plan import plan
from fusedrl.cli.realloc import realloc
from fusedrl.cli.schedule import schedule
from fusedrl.cli.simulate import simulate
from fusedrl.cli.train import train_command

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fusedrl: fast RLHF (PPO) with inter-/intra-stage fusion and "
                       "parameter reallocation.")


@app.callback()
def _group() -> None:
    """Keeps ``fusedrl`` a command group even while it has a single sub-command."""


app.command("train")(train_command)
app.command("realloc")(realloc)
app.command("schedule")(schedule)
app.command("simulate")(simulate)
app.command("plan")(plan)
app.add_typer(bench, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
