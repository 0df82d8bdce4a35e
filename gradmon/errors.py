"""The one exception type users catch: bad input to gradmon, named with what is allowed."""

from __future__ import annotations


class GradmonError(ValueError):
    """Bad configuration or API arguments.

    The message names the field or argument, the value and what is allowed.
    """
