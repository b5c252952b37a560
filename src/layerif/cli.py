"""Command line: `layerif score | demo | allocate | prune | evaluate | moe`. Thin: parse, call the API, print."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LayerIF: data-driven layer quality scores for language models, and their uses.")
allocate_app = typer.Typer(no_args_is_help=True, help="Turn layer scores into per-layer expert counts or sparsities.")
moe_app = typer.Typer(no_args_is_help=True, help="Train and evaluate LoRA-MoE adapters with per-layer expert counts.")
app.add_typer(allocate_app, name="allocate")
app.add_typer(moe_app, name="moe")


# ---- scoring commands (layerif score, layerif demo) ----
# ---- end scoring commands ----


# ---- pruning commands (layerif allocate sparsity, layerif prune, layerif evaluate) ----
# ---- end pruning commands ----


# ---- LoRA-MoE commands (layerif allocate experts, layerif moe train, layerif moe evaluate) ----
# ---- end LoRA-MoE commands ----


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    from layerif.errors import LayerIFError

    try:
        app(args=argv, standalone_mode=True)
    except LayerIFError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("LAYERIF_DEBUG"):
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {exc} (set LAYERIF_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
