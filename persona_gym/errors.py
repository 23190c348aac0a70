"""The errors a user can fix, as one family.

Every error persona-gym raises for bad input (a missing or corrupted file, a bad argument, a
refused overwrite, a failed backend) is a :class:`PersonaGymError` whose message names the file,
field or value and says how to fix it. The ``persona-gym`` command prints such an error as one
line on stderr and exits with status 2 (a traceback only with ``-v``); see
:func:`persona_gym.cli.main`.

Each subclass also derives from the builtin type callers caught before this family existed
(``ValueError``, ``TypeError``, ``FileExistsError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ConfigTypeError", "PersonaGymError", "StageError"]


class PersonaGymError(Exception):
    """Bad input or a refused operation; the message names what is wrong and the fix."""


class ConfigError(PersonaGymError, ValueError):
    """A setting has a bad value (the message names the field and the value)."""


class ConfigTypeError(PersonaGymError, TypeError):
    """A setting has the wrong type (the message names the field and the value)."""


class StageError(PersonaGymError, FileExistsError):
    """A stage would overwrite the results of an earlier run (``--force`` replaces them)."""
