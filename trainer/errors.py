"""The one exception type for mistakes a user can fix: the CLI prints it plainly and exits 2."""


class UserError(Exception):
    """A problem in the user's config, files or request. The message names the field or file and the fix."""
