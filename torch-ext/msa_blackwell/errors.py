"""Exception types of the public API."""


class MsaUnsupportedError(ValueError, NotImplementedError):
    """A well-formed but unsupported configuration (head dim, GQA ratio, block size, ...).

    Subclasses both ``ValueError`` (this package's contract) and ``NotImplementedError``
    (what upstream MiniMaxAI/msa raises), so callers written for either keep working.
    """
