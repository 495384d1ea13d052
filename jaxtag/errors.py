"""The one exception type of jaxtag's bad-input errors.

Every error that a user's input can cause (a file that cannot be decoded, a damaged checkpoint,
weights that do not fit, a download that failed, an unknown tag...) is a `JaxtagError` subclass
whose message is one line naming the file or value and what is wrong; the commands print exactly
that line (`jaxtag CMD: MESSAGE`) and exit 2. It subclasses ValueError, so code that caught
ValueError before keeps working.
"""


class JaxtagError(ValueError):
    """Bad input to jaxtag: the message is one line naming what is wrong and where."""
