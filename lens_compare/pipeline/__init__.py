"""One comparison's lifecycle: prepare, preflight, execution, the Comparison orchestrator and compare()."""
