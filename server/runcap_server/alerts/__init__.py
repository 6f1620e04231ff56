"""Alert notifications: rules, the engine that follows runs' changes and
raises alerts, their store, message formats and delivery (docs/alerts.md).

Nothing here runs on the Reserve path: the engine reads the same change logs
Watch reads, in tasks of its own, and a slow or failing receiver delays only
its own deliveries.
"""
