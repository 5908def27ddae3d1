"""Read checkpoints without the training code: inspect, diff, verify, export."""
