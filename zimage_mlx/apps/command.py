"""What every `zimage-mlx` command shares: one-line usage errors (exit 2) and the run guard that turns a runtime
failure into one line (exit 1) and Ctrl-C into "interrupted" (exit 130)."""

from __future__ import annotations

import os
import sys
import traceback

import click

PEER_LOST = "[ring] connection to a peer was lost"
PEER_LOST_HINT = " (another process of the launch failed or was stopped)"


class Command(click.Command):
    """A click command whose usage errors are one line ("Error: ...") without the usage block."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            e.ctx = None
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            e.ctx = None
            raise


def note(msg: str) -> None:
    click.echo(msg, err=True)


def interrupted() -> None:
    """Ctrl-C: one line, exit 130 (never a traceback, wherever it lands: an import, a load, a step)."""
    click.echo("\ninterrupted", err=True)
    sys.exit(130)


def run_guarded(fn, verbose: bool, who: str = "") -> None:
    """Run fn; a runtime failure prints one line and exits 1 (the traceback first with --verbose).
    who: "process R of N: " under mlx.launch, so each process's line says which one failed."""
    hint = "" if verbose else " (--verbose for the traceback)"
    if who:
        from ..distributed import watch_for_lost_peers

        # a collective that waits forever on a dead peer (distributed.watch_for_lost_peers) ends the same way
        watch_for_lost_peers(lambda: exit_launched(f"error: {who}{PEER_LOST}{PEER_LOST_HINT}"))
    try:
        fn()
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except KeyboardInterrupt:
        interrupted()
    except Exception as e:  # noqa: BLE001 - the CLI's one-line error contract
        if verbose:
            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        if who and "connection to a peer was lost" in msg:
            msg += PEER_LOST_HINT
        if who:
            exit_launched(f"error: {who}{msg}{hint}")
        click.echo(f"error: {msg}{hint}", err=True)
        sys.exit(1)


def exit_launched(line: str) -> None:
    """Under mlx.launch a dead peer can leave MLX's communication threads blocked, and the interpreter's normal
    shutdown would wait for them: print the error line and leave at once (nothing is half-written: images are
    atomic)."""
    click.echo(line, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
