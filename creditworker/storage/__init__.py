"""Storage: the tables, engines and transactions, migrations, and the two storage paths
(`backends/`). It imports nothing of the engine above it."""
