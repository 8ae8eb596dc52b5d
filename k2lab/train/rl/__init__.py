"""Reinforcement learning for post-training: trajectories (token in, token out), losses, rewards."""
