"""POP3 front over the same INBOX view as IMAP."""
