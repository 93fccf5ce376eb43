"""clusterfit recipes."""

RECIPES: dict = {}
