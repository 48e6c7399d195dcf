"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os

# Two cores on CI: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
