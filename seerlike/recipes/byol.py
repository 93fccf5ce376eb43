"""byol recipes."""

RECIPES: dict = {}
