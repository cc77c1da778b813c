"""What the trainer (train_accelerate.py) is made of: config, objective, run folder, checkpoints, launch, clock,
model card, resources."""
