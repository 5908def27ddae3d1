"""Trainers written the way users write them, each run by ``ckptguard.testing`` in fresh
processes (uninterrupted vs interrupted + resumed) from the e2e tests."""
