"""The Jinja admin portal for tenant admins and platform operators (mounted under /portal).

Its pages are not built yet; the cookie login it will use exists (``/v1/auth/cookie``).
"""
