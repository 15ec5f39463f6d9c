"""One exception type for every bad input a user can give rflow.

The CLI prints ``UserError`` as a single line on stderr and exits with code 2; any other
exception is a bug in rflow and keeps its traceback.
"""


class UserError(ValueError):
    """A bad input (path, file, option, shape) described in one line."""
