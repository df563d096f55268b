"""The mlx-bridge worker process."""
