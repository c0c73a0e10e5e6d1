"""Multi-tenant SaaS kit for FastHTML: host database, per-tenant databases, billing, auth, jobs and audit."""

__version__ = "0.1.0"
