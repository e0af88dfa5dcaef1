"""The one exception type for mistakes a user can make (a path, layer index, YAML key, URL).

The CLI turns it into a single sentence and a non-zero exit; everything else is a bug and keeps
its traceback.
"""


class AutolayerError(Exception):
    """A user-caused error whose message is one clear sentence."""
