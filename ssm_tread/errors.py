"""The base of the errors a user can fix: the tools print their message in one line per problem, without a
traceback (``--debug`` or SSM_TREAD_DEBUG=1 shows it); every other error is a bug and shows everything."""


class UserError(Exception):
    """Bad input or a state of the disk the user can fix; the message names the problem and the fix.
    ``exit_code``: what a tool exits with (2 for a bad config, as for bad arguments). ``node_local``: the
    problem may be this node's alone (a path on its own disk), so under torchrun the first rank of every
    node prints it, not only rank 0."""

    exit_code = 1
    node_local = False
