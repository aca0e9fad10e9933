"""Delivery for the example: SMTP when $SMTP_URL is set, otherwise .eml files in an outbox folder."""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

SENDER = "welcome@example.com"


def welcome_message(user_id: int, email: str, name: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = email
    message["Subject"] = f"Welcome aboard, {name}!"
    message["X-User-Id"] = str(user_id)
    message.set_content(f"Hi {name},\n\nthanks for signing up. We're glad you're here.\n")
    return message


def deliver(message: EmailMessage) -> None:
    """Send through $SMTP_URL (smtp://host:port), or write to $OUTBOX_DIR (default ./outbox)."""
    smtp_url = os.environ.get("SMTP_URL")
    if smtp_url:
        parts = urlsplit(smtp_url)
        with smtplib.SMTP(parts.hostname or "localhost", parts.port or 25, timeout=30) as smtp:
            if parts.username:
                smtp.login(parts.username, parts.password or "")
            smtp.send_message(message)
        return
    outbox = Path(os.environ.get("OUTBOX_DIR", "outbox"))
    outbox.mkdir(parents=True, exist_ok=True)
    final = outbox / f"welcome-{message['X-User-Id']}.eml"
    partial = final.with_suffix(".tmp")
    partial.write_bytes(message.as_bytes())
    partial.replace(final)  # atomic: a crash never leaves half an email behind
