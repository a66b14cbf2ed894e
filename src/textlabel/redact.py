"""Secrets out of everything textlabel prints or writes: the one home of the rule.

A URI's userinfo (``scheme://user:password@host``, or a token as the user, ``https://TOKEN@host``) becomes
``scheme://***@host``. The userinfo is what RFC 3986 (and ``urllib.parse``) says it is: the authority (after
``//``, up to the first ``/``, ``?``, ``#`` or whitespace) up to its last ``@``. A password that should have
been percent-encoded and was not (``user:pa/ss@host``) breaks that authority; one that reads ``user:`` followed
by anything but a port is taken to be such a password, and the userinfo then runs to the last ``@`` before
whitespace (hiding more than the password rather than part of it).

A ``name=value`` whose name ends in a credential's word (``X-Amz-Signature``, ``X-Amz-Credential``,
``X-Amz-Security-Token``, ``token``, ``password``, ``AWS_SECRET_ACCESS_KEY``, ``sig``, ...) keeps its name and
loses its value, where it starts a query parameter (after ``?``, ``&`` or ``;``) or a word.

Only what is shown is redacted: connections keep using the real values. Nothing here imports beyond the
standard library, so every module (and every Ray worker) can use it.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any

MASK = "***"

_URI = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)(\S*)")
_PORT = re.compile(r"\d+")
# name=value starting a query parameter or a word, the name ending in a credential's word.
_CREDENTIAL_PARAM = re.compile(
    r"(?i)((?:^|(?<=[?&;\s]))[\w.-]*?(?:token|secret|password|passwd|pwd|signature|credential|credentials|key|sig|auth)=)"
    r"[^&#\s'\"<>]+")


def _userinfo_end(rest: str) -> int:
    """Where the userinfo of a URI's text after ``//`` ends (at its last ``@``); -1 when it has none."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        return authority.rindex("@")
    _, colon, after = authority.partition(":")
    # user:pa/ss@host, a password left unencoded (an IPv6 host's colons are in brackets: not a user's)
    if colon and not authority.startswith("[") and not _PORT.fullmatch(after) and "@" in rest:
        return rest.rindex("@")
    return -1


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, rest = match.groups()
    end = _userinfo_end(rest)
    if end < 0:
        return scheme + _URI.sub(_mask_userinfo, rest)  # a URI inside this one's text (?next=https://...)
    return f"{scheme}{MASK}" + _URI.sub(_mask_userinfo, rest[end:])


def redact(text: str) -> str:
    """``text`` with every URI's userinfo and every credential parameter's value replaced by ``***``."""
    if "@" not in text and "=" not in text:  # the common case: nothing to scan for
        return text
    return _CREDENTIAL_PARAM.sub(rf"\g<1>{MASK}", _URI.sub(_mask_userinfo, text))


def redact_values(value: Any) -> Any:
    """A JSON-like value (dicts, lists, tuples, strings) with every string redacted: what a summary, metrics.json
    or a run's settings hold, made safe to write. Keys are kept as they are; other values are returned as given."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_values(v) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's message, traceback and stack before any handler formats it.

    The message is rendered (``msg % args``) and redacted once, so a secret passed as an argument is caught too;
    the traceback is rendered into ``exc_text``, which formatters print instead of rendering their own."""

    _tracebacks = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave the record for the handler's own error report
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._tracebacks.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger) -> None:
    """Add a RedactingFilter to every handler of ``logger`` that lacks one (calling it again adds nothing), and
    redact every record as it is made, whatever logger and handler it goes to: a library that configures its own
    handler and stops propagation (MLflow does, when it is first imported) bypasses the root's handlers."""
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    made = logging.getLogRecordFactory()
    if not getattr(made, "redacts", False):
        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = made(*args, **kwargs)
            _SCRUB.filter(record)
            return record

        factory.redacts = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)


_SCRUB = RedactingFilter()


def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """``sys.excepthook`` for the jobs: an uncaught error's traceback, redacted, on stderr."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))
