"""The Jinja admin portal for tenant admins and platform operators, mounted under /portal.

Server-rendered pages on the same services as the API; signed in with the session cookie of
``/v1/auth/cookie``. See :mod:`portal.web` for the pages and :mod:`portal.security` for the
browser protections.
"""
