"""Side stores beside the ledger: outbox, dead letters, ledger records, ledger file, audit."""
