"""Where `CreditService` lived before the engine package; kept so old imports still work."""

from creditworker.engine.service import CreditService, entry_model

__all__ = ["CreditService", "entry_model"]
