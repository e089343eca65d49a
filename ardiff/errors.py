"""The error type for mistakes a user can fix (bad flag, bad config value, missing file...).

:class:`UsageError` is a ``ValueError``, so library callers that already catch ``ValueError`` keep working; the
command line (:mod:`ardiff.cli`) prints it as one ``error: ...`` paragraph and exits 2 instead of a traceback.
"""


class UsageError(ValueError):
  """An expected, user-fixable error; its message names the offending value and the fix."""
