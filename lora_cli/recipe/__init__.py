"""The recipe: schema (schema.py), reading and validation (load.py), writing it back (show.py)."""
