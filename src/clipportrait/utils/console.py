"""Rich console output: the config tree at start, progress bars for long work."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.syntax import Syntax
from rich.tree import Tree

console = Console(stderr=True)
T = TypeVar("T")


def print_config_tree(cfg: DictConfig, first: tuple[str, ...] = ("task",)) -> None:
    """Print the composed config as a tree, one branch per group (task first)."""
    tree = Tree("config", guide_style="dim")
    keys = list(first) + [k for k in cfg.keys() if k not in first]
    for key in keys:
        if key not in cfg:
            continue
        node = cfg[key]
        branch = tree.add(f"[bold]{key}")
        text = OmegaConf.to_yaml(node, resolve=False) if isinstance(node, DictConfig) else str(node)
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    console.print(tree)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar (count, elapsed, remaining); plain iteration when not a TTY."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
