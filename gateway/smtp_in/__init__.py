"""SMTP submission front: legacy programs hand their mail to the gateway here."""
