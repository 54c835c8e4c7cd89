"""One error type for everything a user (or an operator's flag) got wrong.

Every user-facing error in the project subclasses ``InputError`` without a constructor of its own, so
REST, the UI and the command lines can all answer it the same way: ``field`` names the input (a form
field, a JSON key, a flag) and ``message`` says what is wrong and what is allowed. ``str(error)`` is
``"<field>: <message>"``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: ``field`` names it, ``message`` explains what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # keeps (field, message) across pickling (engine messages, worker processes)
        return (type(self), (self.field, self.message))
