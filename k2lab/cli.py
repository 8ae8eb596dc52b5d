"""`k2lab <command>`: a thin command line; each command calls one function of a pipeline stage."""

from __future__ import annotations

import typer

app = typer.Typer(help="k2lab: the Kimi K2.6 system at laptop scale.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
