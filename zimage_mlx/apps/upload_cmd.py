"""`zimage-mlx upload`: publish a converted directory as a hub model (loading.publish)."""

from __future__ import annotations

import click

from ..loading.publish import upload
from .command import Command, run_guarded


@click.command("upload", cls=Command)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to upload to (created when missing).")
@click.option("--dry-run", is_flag=True, help="Write the model card and list what would be uploaded; send nothing.")
@click.option("--overwrite", is_flag=True, help="Replace a repository that holds another model.")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks on errors.")
def upload_command(directory, repo_id, private, revision, dry_run, overwrite, verbose):
    """Publish DIRECTORY (made by `zimage-mlx convert`) as the hub model REPO_ID (owner/name), with a model card;
    it then loads with `--model REPO_ID`, downloading only its files."""
    run_guarded(lambda: upload(directory, repo_id, private=private, revision=revision, dry_run=dry_run,
                               overwrite=overwrite), verbose)
