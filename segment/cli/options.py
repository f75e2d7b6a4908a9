"""What the `segment` commands share: option types, typed flag parsing, and one red line instead of a traceback for
any error a user can cause."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from segment.errors import SegmentError

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: segment/configs/default.yaml)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a config key, e.g. --set train.max_epochs=5")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help="dataset folder (MSD/nnU-Net layout or image/label pairs)")]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a SegmentError, or an OSError about a path (permission denied, disk full), as one red line and exit 2,
    instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SegmentError as err:
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as err:
            if err.filename is None:  # not about a path the user gave or owns: a bug, keep its traceback
                raise
            from rich.console import Console

            # a folder we may not read or write, a full or read-only disk: the path and the reason, not a traceback
            Console(stderr=True).print(f"[bold red]error:[/] {err.filename}: {err.strerror or type(err).__name__}",
                                       highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


def config_from(config: Path | None, overrides: list[str] | None, extra: dict[str, Any]) -> Any:
    """Config file + --set overrides + explicit flags (only those the user gave), all through the same validation.

    Flags keep their type (`--data 2024` is a folder, never the number 2024); only `--set key=value` parses YAML.
    """
    from segment.config import load_config

    return load_config(config, list(overrides or []), given_flags(extra))


def given_flags(extra: dict[str, Any]) -> dict[str, Any]:
    """The flags the user gave, as typed config values: paths as text, everything else as parsed by typer."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in extra.items() if value is not None}


def parse_skips(text: str | None) -> str | list[int] | None:
    """--skips: all, none, or levels such as [0,1] / 0,1."""
    if text is None or text.strip() in ("all", "none"):
        return None if text is None else text.strip()
    try:
        return [int(p) for p in text.strip().removeprefix("[").removesuffix("]").split(",") if p.strip()]
    except ValueError:
        raise SegmentError(f"--skips {text!r}: expected all, none or levels such as [0,1]") from None


def parse_devices(text: str | None) -> int | str | None:
    """--devices: a count (2, -1 = all) or a Lightning device string (auto, '0,1')."""
    return int(text) if text is not None and text.strip().lstrip("-").isdigit() else text
