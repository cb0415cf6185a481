"""Cross-backend conformance suite (filled by the conformance issue)."""
