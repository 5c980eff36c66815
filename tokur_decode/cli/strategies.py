"""``tokur-decode strategies``: the shipped recipes, one line each."""

from __future__ import annotations

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    sub.add_parser("strategies", help="list the shipped strategy recipes, one line each")


def run(args) -> int:
    from ..strategies.recipe import available

    recipes = available()
    width = max(map(len, recipes))
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    return 0
