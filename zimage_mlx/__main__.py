"""`python -m zimage_mlx`: the `zimage-mlx` command group (generate, convert, info)."""

from .generate import cli

cli(prog_name="zimage-mlx")
