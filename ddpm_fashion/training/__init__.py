"""What the trainer (train_accelerate.py) is made of: config, objective, run folder, checkpoints, model card, resources."""
