"""Checks for `schemathesis run` (loaded with SCHEMATHESIS_HOOKS=schemathesis_hooks)."""

import schemathesis


@schemathesis.check
def not_a_server_error_but_overload(ctx, response, case):
    """No 5xx, except 503 (overloaded: the client may retry)."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"{response.status_code} {response.text[:300]}")
