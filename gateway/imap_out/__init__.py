"""IMAP front: the mailbox's INBOX, read-only by default, for legacy readers."""
