"""Small helpers shared by entry points and evaluation (image grids)."""
