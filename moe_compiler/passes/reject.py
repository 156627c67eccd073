"""Why a region was left alone."""


class Reject(Exception):
    """Raised by a recognizer when it cannot prove a fact the op needs; the message is the reason shown
    in the log and the dump, so it names what was expected and what the graph had."""
