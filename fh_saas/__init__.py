"""Multi-tenant SaaS kit for FastHTML: host database, per-tenant databases, billing, auth, jobs and audit.

Modules:

- `fh_saas.stripe_models`: What fh_saas keeps of Stripe's objects: each tenant's customer, its subscriptions in event order, and how Stripe's fields are read."""

__version__ = "0.1.0"
