"""`python -m zimage_mlx`: the `zimage-mlx` command group (generate, convert, info)."""

from .apps.cli import cli

cli(prog_name="zimage-mlx")
