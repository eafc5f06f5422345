"""Notifications out of the house: the event exchange (publish, consume, tail)."""
