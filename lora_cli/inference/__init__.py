"""Using a trained model: generating text (generation.py) and scoring held-out data (scoring.py)."""
