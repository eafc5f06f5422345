"""Where `SubscriptionService` lived before the engine package; kept so old imports still work."""

from creditworker.engine.subscriptions import SubscriptionService, plan_model, subscription_model

__all__ = ["SubscriptionService", "plan_model", "subscription_model"]
