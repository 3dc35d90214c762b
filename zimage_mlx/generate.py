"""`python -m zimage_mlx.generate`: the generate command (the command line itself lives in cli.py)."""

from .apps.cli import generate_main

if __name__ == "__main__":
    generate_main()
