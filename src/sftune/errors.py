"""The one exception type for user mistakes.

Anything a user can fix (a bad flag, a missing file, an unreachable Hub) raises
`SftuneError` with a message that names the problem, the value and the fix.
The CLI prints it without a traceback and exits with status 2.
"""


class SftuneError(Exception):
    """A problem the user can fix; the message says how."""

    exit_code = 2
    # under torchrun a mistake found before the ranks meet is said by the node's first rank alone (it is the same on
    # every rank); one that is this rank's own says so, and is said by it
    this_rank_only = False
    # after the ranks met, each says its own error, unless every rank raises this one alike (from the command line
    # and the shared checkpoint: a refused resume): then rank 0 alone
    every_rank = False


def on_every_rank(error: SftuneError) -> SftuneError:
    """`error`, marked as one that every rank raises alike (`SftuneError.every_rank`)."""
    error.every_rank = True
    return error


class TrainingDiverged(SftuneError):
    """Too many optimizer steps in a row had a non-finite loss or gradient; the last good state was saved."""

    exit_code = 3


def remote_code_hint(e: Exception) -> str:
    """The library's message, with its Python advice (`trust_remote_code=True`) turned into our flag."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"  # (in one line: some messages are lists of lines)
    text = text if len(text) <= 300 else text[:300].rsplit(" ", 1)[0] + " ..."
    if "trust_remote_code" in str(e) or "contains custom code" in str(e):
        return ("this model's code lives in its repository and runs only when allowed: pass --trust-remote-code "
                "if you trust its source (or set trust_remote_code: true in the YAML config)")
    return text


def compiler_error(e: Exception) -> str:
    """A compiler failure in a line: its type and the first two lines of its message (their cause), at most 300
    characters (torch.compile's own errors run to pages)."""
    lines = [line for line in str(e).splitlines() if line.strip()][:2]
    return f"{type(e).__name__}: {' '.join(lines)}"[:300]
