"""User-facing errors: one line that names the problem and the fix.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class PersonalizeError(Exception):
    """A problem with the user's input, config or environment, with a message that says how to fix it."""
