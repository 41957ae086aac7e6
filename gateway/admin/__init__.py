"""The local admin web page: accounts, consent, status."""
