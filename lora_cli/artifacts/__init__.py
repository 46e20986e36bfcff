"""What a run leaves for people to read: model cards (model_card.py) and the loss plot (loss_plot.py)."""
