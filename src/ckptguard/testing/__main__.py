"""``python -m ckptguard.testing``: one leg of the resume harness (see ``harness._main``)."""

from ckptguard.testing.harness import _main

_main()
