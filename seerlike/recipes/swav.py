"""swav recipes."""

RECIPES: dict = {}
