"""llmtrain.compat: every private touchpoint still exists and behaves as llmtrain relies on."""

from __future__ import annotations
