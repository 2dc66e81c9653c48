"""The few private attributes of Lightning, DeepSpeed and torch that llmtrain still needs, each behind one function.

Everything else uses public APIs. Each touchpoint here has a test in tests/test_compat.py that fails loudly (naming
the attribute and the library version) when an upgrade removes or changes it, so a version bump breaks one test
instead of a run.
"""

from __future__ import annotations
