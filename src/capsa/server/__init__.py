"""``capsa serve``: the HTTP API (app.py), its bodies (models.py), how it listens (run.py)."""
