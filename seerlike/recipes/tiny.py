"""tiny recipes."""

RECIPES: dict = {}
