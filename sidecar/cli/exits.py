"""Exit statuses of `tombstone-sidecar`, defined once for every subcommand.

Scripts branch on them (`check NAME && ...`), so a number keeps its meaning across
subcommands: 0 is success, 2 is always "you asked wrongly", 3 always "no answer to be had".
"""

OK = 0  # done; for `check`: the name is alive
# `check`: the name is gone (a tombstone, or its unreachable breaker is open), so a script
# reads `check NAME` as "is it alive?".
GONE = 1
NOT_FOUND = 1  # `verdicts show|forget`: the sidecar has no verdict for that name
FAILED = 1  # `run`: the sidecar stopped on an error after it had started
# argparse's own status for bad arguments; every bad option value, file or name shares it,
# so "fix the command line" is one status whatever the mistake.
USAGE = 2
# No answer to be had: `check`: DNS could not answer, so there is no verdict (the sidecar
# would forward); `verdicts`: the sidecar could not be reached or refused the request.
NO_ANSWER = 3
