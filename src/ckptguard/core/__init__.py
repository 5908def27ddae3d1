"""The engine: format, storage, commit, integrity, states, policy. Imports nothing above it."""
