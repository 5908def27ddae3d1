__version__ = "0.1.0"

# Bumped when a checkpoint written by this version cannot be read by an older ckptguard.
FORMAT_VERSION = 1
