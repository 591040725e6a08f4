"""PB's wire format (banana) decoded within bounds: message size and nesting.

Twisted's decoder (:meth:`twisted.spread.banana.Banana.dataReceived`) limits
each string and list to 640 KiB, but not a message: a list of many such
strings, 24 MB in all, is decoded and kept until its last byte, before the
broker even looks at it.  Lists may nest as deep as the client likes, and
unjelly then recurses until Python's recursion limit (a traceback of a
thousand frames in the log per message).  It also copies the rest of its
buffer once per item, which makes a large message cost quadratic time.

:class:`BoundedBanana` decodes the same format with the same items handed to
``gotItem``, but counts the bytes of each top-level message as they come and
refuses the message as soon as its size is known to pass ``message_limit`` (a
string or list announces its length first, so nothing of it is buffered), or
its lists nest deeper than ``MAX_DEPTH``.  A refusal is one line in the log;
the connection is closed.  The buffer is kept as a list of reads while a long
string is incomplete, so the work is linear in the bytes received.
"""

from __future__ import annotations

import re
import struct
from typing import Any, cast

from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.spread import banana

log = Logger()

BEFORE_LOGIN_LIMIT = 64 << 10  # bytes of one message before authenticate succeeded
MESSAGE_LIMIT = 1 << 20  # after: a 64 KiB upload chunk and a long run() word list fit
MAX_DEPTH = 32  # lists in lists in one message (a PB call needs fewer than 10)

_TYPE_BYTE = re.compile(rb"[\x80-\xff]")
_LIST, _INT, _STRING, _NEG, _FLOAT, _LONGINT, _LONGNEG, _VOCAB = range(0x80, 0x88)


class MessageRefused(Exception):
    """A message the door does not decode; the text is the reason, for the log."""


class BoundedBanana(banana.Banana):
    """Banana's decoder with a size limit per message and a nesting limit."""

    message_limit = BEFORE_LOGIN_LIMIT
    refused = False  # a message was refused: the connection is closing, input is ignored
    _message_size = 0  # bytes of the current top-level message decoded so far
    _need = 0  # bytes the buffer must hold before decoding can go on
    _waiting: list[bytes] | None = None  # reads kept until _need bytes are there
    _waiting_size = 0

    def dataReceived(self, chunk: bytes) -> None:
        if self.refused:
            return
        if self._need:
            waiting = self._waiting
            assert waiting is not None
            waiting.append(chunk)
            self._waiting_size += len(chunk)
            if self._waiting_size < self._need:
                return
            chunk, self._waiting, self._waiting_size, self._need = b"".join(waiting), None, 0, 0
        try:
            self._decode(self.buffer + chunk if self.buffer else chunk)
        except MessageRefused as e:
            self.refuse(str(e))

    def refuse(self, reason: str) -> None:
        """Drop what was decoded of the message, say why in the log, close."""
        self.refused = True
        self.buffer = b""
        self.listStack = []
        self._waiting = None
        log.info("pb: {peer}: {reason}; closing the connection", peer=self.peer_text(),
                 reason=reason)
        if self.transport is not None:
            # Aborted, not closed: a client that does not read must not keep it open.
            cast(ITCPTransport, self.transport).abortConnection()

    def peer_text(self) -> str:
        return str(self.transport.getPeer()) if self.transport is not None else "?"

    def _decode(self, buffer: bytes) -> None:
        end = len(buffer)
        pos = 0
        stack = self.listStack
        got = self.gotItem
        limit = self.message_limit
        prefix_limit = cast(int, self.prefixLimit)  # set in connectionMade
        find_type = _TYPE_BYTE.search
        self.buffer = b""  # (a message handler that raises drops the connection anyway)
        while pos < end:
            m = find_type(buffer, pos)
            if m is None:
                if end - pos > prefix_limit:
                    raise MessageRefused(f"more than {prefix_limit} bytes of prefix")
                break
            at = m.start()
            if at - pos > prefix_limit:
                raise MessageRefused(f"more than {prefix_limit} bytes of prefix")
            num = banana.b1282int(buffer[pos:at]) if at > pos else 0
            kind = buffer[at]
            start, pos = pos, at + 1
            item: Any
            if kind == _STRING:
                if num > banana.SIZE_LIMIT:
                    raise MessageRefused("a string over banana's size limit")
                self._check_size(pos - start + num, limit)
                if end - pos < num:
                    self._wait(buffer, start, pos + num - start)
                    return
                item = buffer[pos:pos + num]
                pos += num
            elif kind == _LIST:
                if num > banana.SIZE_LIMIT:
                    raise MessageRefused("a list over banana's size limit")
                if len(stack) >= MAX_DEPTH:
                    raise MessageRefused(f"lists nested more than {MAX_DEPTH} deep")
                # Each element takes at least one byte: refuse what cannot fit at once.
                self._check_size(pos - start + num, limit)
                self._message_size += pos - start
                stack.append((num, []))
                self._complete_lists(stack, got)
                continue
            elif kind == _INT or kind == _LONGINT:
                item = num
            elif kind == _NEG or kind == _LONGNEG:
                item = -num
            elif kind == _VOCAB:
                item = self.incomingVocabulary.get(num)
                if item is None or self.currentDialect != b"pb":
                    raise MessageRefused("an unknown vocabulary symbol")
            elif kind == _FLOAT:
                if end - pos < 8:
                    self._wait(buffer, start, pos + 8 - start)
                    return
                item = struct.unpack("!d", buffer[pos:pos + 8])[0]
                pos += 8
            else:
                raise MessageRefused(f"an invalid type byte 0x{kind:02x}")
            self._check_size(pos - start, limit)
            self._message_size += pos - start
            got(item)
            self._complete_lists(stack, got)
        self.buffer = buffer[pos:] if pos < end else b""

    def _complete_lists(self, stack: list, got: Any) -> None:
        while stack and len(stack[-1][1]) == stack[-1][0]:
            got(stack.pop()[1])
        if not stack:
            self._message_size = 0  # a top-level message is complete

    def _check_size(self, more: int, limit: int) -> None:
        if self._message_size + more > limit:
            raise MessageRefused(f"a message over {limit >> 10} KiB")

    def _wait(self, buffer: bytes, start: int, size: int) -> None:
        """An item starting at ``start`` needs ``size`` bytes: keep the rest of
        ``buffer`` and decode again once that many are in."""
        self.buffer = b""
        self._waiting = [buffer[start:]]
        self._waiting_size = len(buffer) - start
        self._need = size
