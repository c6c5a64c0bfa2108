"""Training and fine-tuning: data (data.py) and the loop with checkpoints and exact resume (loop.py)."""
