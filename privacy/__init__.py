"""Privacy accounting and the per-client ledger. Imports neither client nor server."""
