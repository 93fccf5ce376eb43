"""seer recipes."""

RECIPES: dict = {}
