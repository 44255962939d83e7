"""Limits and budgets per team and per key: what they are (``model``), how a request is admitted
against them in this process (``memory``) or across processes (``redis_limiter``), the refusal and
the ``x-ratelimit-*`` headers (``outcome``)."""
